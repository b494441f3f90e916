//! What tenants read about a failed attempt (`last_error`, `attempt_log` in `GET
//! /jobs/:id`): a stable code and a canned sentence. No engine or SDK text, image
//! reference, host name, worker id or internal path: the detail of a failure goes to the
//! server log and to operators (`GET /admin/jobs/:id`) only (J1, issue 12).

/// The sentence for a code; codes this table does not know read as a plain failure.
pub fn sentence(code: &str) -> &'static str {
    match code {
        "database" => "The platform's database did not answer; the job is retried.",
        "backend" => "The workspace backend could not complete the operation; the job is retried.",
        "no_backend" => "This platform has no workspace backend configured.",
        "image_missing" => "The workspace's runtime image is not available on this platform.",
        "engine_unavailable" => "The platform's workspace backend (container engine or cloud API) did not answer.",
        "engine_refused" => "The platform's workspace backend (container engine or cloud API) refused the operation.",
        "restart_in_progress" => "Another start, restart or stop of this workspace is running; this job waits its turn.",
        "invalid_input" => "The job's input is not valid for its kind.",
        "undecodable_payload" => "The job's input could not be read.",
        "handler_panicked" => "The job failed unexpectedly; the platform's log has the details.",
        "rescue_budget" => "The rescue capture ran out of its time budget.",
        "no_console" => "This workspace has no serial console (only EC2 workspaces have one).",
        "no_redactor" => "No secret redactor is configured, so nothing was captured.",
        "agent_unreachable" => "The workspace's agent could not be reached; delivery is retried.",
        "agent_url_refused" => "The agent's URL points to an address the platform does not deliver to.",
        "exec_failed" => "The command could not be run in the workspace.",
        "sweep" => "The maintenance sweep failed; it runs again at its next tick.",
        "interrupted" => "Its worker stopped before it finished (shutdown, or a lost heartbeat); it is not run again.",
        "expired" => "It expired before it could run.",
        "worker_lost" => "Its worker stopped heartbeating while it ran; it runs again if it may.",
        "result_not_stored" => "Its result could not be stored.",
        "job_failed" => "The job failed; the platform's log has the details.",
        _ => "The job failed; the platform's log has the details.",
    }
}

/// `code: sentence`, as stored in `last_error`.
pub fn public(code: &str) -> String {
    format!("{code}: {}", sentence(code))
}
