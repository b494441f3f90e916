//! The OpenAPI document of every route, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{a2a, console, exec, health, jobs, metrics, queues, registry, rescue, tokens, workspaces};

#[derive(OpenApi)]
#[openapi(
    info(title = "Molecule workspace server", description = "Validates, writes and enqueues; workers do the work."),
    paths(
        health::healthz, health::readyz, metrics::render,
        workspaces::create, workspaces::list, workspaces::get, workspaces::delete, workspaces::restart, workspaces::events,
        jobs::get, jobs::list, jobs::cancel, jobs::retry, jobs::admin_get,
        queues::queues,
        registry::register, registry::heartbeat,
        rescue::bootstrap_failed, rescue::latest, console::console,
        exec::exec,
        tokens::issue,
        a2a::send, a2a::lookup, a2a::activity,
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&Security),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        c.add_security_scheme("admin", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
