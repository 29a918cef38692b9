//! WebhookReceiver: `POST /api/webhooks/{provider}`, validates a provider's webhook delivery
//! and turns it into sync work.

use super::InvocationError;
use crate::app::App;
use crate::protocol::{HttpRequest, HttpResponse, InvocationResponse};

pub async fn run(
    app: &App,
    output: &str,
    req: HttpRequest,
) -> Result<InvocationResponse, InvocationError> {
    let res = |response: HttpResponse| Ok(InvocationResponse::new().with_http(output, response));
    if req.method != "POST" {
        return res(HttpResponse::error(
            405,
            format!("webhooks are delivered with POST, not {}", req.method),
        ));
    }
    let Some(provider) = req.params.get("provider").filter(|p| !p.is_empty()) else {
        return res(HttpResponse::error(
            400,
            "the URL names no provider: expected /api/webhooks/{provider}",
        ));
    };
    let reason = match app.providers.get(provider) {
        None => format!("no webhook receiver for provider `{provider}`"),
        Some(_) => format!("provider `{provider}` does not deliver webhooks to this app"),
    };
    tracing::info!(%provider, %reason, "webhook refused");
    res(HttpResponse::error(404, reason))
}
