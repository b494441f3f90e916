//! The AWS clients (EC2 and EC2 Instance Connect) and what their errors mean to us.

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use std::time::Duration;

use crate::BackendError;

/// EC2's answer for an id it does not know (never launched, or terminated long ago).
pub const NOT_FOUND: &str = "InvalidInstanceID.NotFound";

pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub connect: aws_sdk_ec2instanceconnect::Client,
}

/// Clients for `region`, at `endpoint_url` when set (a local AWS API mock), with the SDK's
/// default credential chain. One HTTP stack (hyper + rustls on ring, as the rest of the
/// server). The SDK retries a failed call once more itself; anything longer-lived is the
/// job's persisted backoff, which survives a restart.
pub async fn clients(region: &str, endpoint_url: Option<&str>) -> Clients {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .http_client(http)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(45))
                .build(),
        );
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let config = loader.load().await;
    Clients { ec2: aws_sdk_ec2::Client::new(&config), connect: aws_sdk_ec2instanceconnect::Client::new(&config) }
}

/// What a failed call means.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    /// The service answered that the instance does not exist.
    NotFound,
    /// The service refused, with its status and error code.
    Service { status: u16, code: String, message: String },
    /// No answer: connection refused or reset, timeout, or a request never built.
    Transport(String),
    /// An answer that could not be read (not the protocol's shape).
    Undecodable { status: u16 },
}

impl Fault {
    pub fn of<E: ProvideErrorMetadata + std::error::Error + 'static>(e: &SdkError<E, aws_sdk_ec2::config::http::HttpResponse>) -> Fault {
        match e {
            SdkError::ServiceError(ctx) => {
                let code = ctx.err().code().unwrap_or("").to_string();
                if code == NOT_FOUND {
                    return Fault::NotFound;
                }
                // No error code: nothing in the answer could be read as an AWS error
                // (the SDK files unparseable bodies here too).
                if code.is_empty() {
                    return Fault::Undecodable { status: ctx.raw().status().as_u16() };
                }
                // The service's own words, bounded (they may name the AMI or subnet: they
                // go to the server log and the operators' job detail, never to tenants).
                let message = ctx.err().message().unwrap_or("").to_string();
                Fault::Service { status: ctx.raw().status().as_u16(), code, message }
            }
            SdkError::ResponseError(ctx) => Fault::Undecodable { status: ctx.raw().status().as_u16() },
            SdkError::TimeoutError(_) => Fault::Transport("timed out".into()),
            SdkError::DispatchFailure(d) => Fault::Transport(
                if d.is_timeout() {
                    "timed out"
                } else if d.is_io() {
                    "connection failed"
                } else {
                    "request not sent"
                }
                .into(),
            ),
            _ => Fault::Transport("request could not be built".into()),
        }
    }

    pub fn into_backend(self, action: &str) -> BackendError {
        match self {
            Fault::NotFound => BackendError::engine(404, &format!("{action}: {NOT_FOUND}")),
            Fault::Service { status, code, message } => BackendError::engine(status, &format!("{action}: {code}: {message}")),
            Fault::Transport(why) => BackendError::EngineUnavailable(format!("{action}: EC2 API unreachable ({why})")),
            // Unreadable is not an answer: worth another attempt, like no answer.
            Fault::Undecodable { status } => {
                BackendError::EngineUnavailable(format!("{action}: undecodable EC2 API answer (status {status})"))
            }
        }
    }
}
