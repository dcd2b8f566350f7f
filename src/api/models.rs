//! `GET /health` and `GET /v1/models`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::server::AppState;

/// 200 once the model is loaded (the router only exists after that).
pub async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "status": "ok", "model": state.model_id }))
}

/// The one model this server serves, in OpenAI's list shape (Anthropic's
/// SDK reads the same `data[].id`).
pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let model = state.engine.model();
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.started_at,
            "owned_by": "hearth",
            "type": "model",
            "display_name": state.model_id,
            "meta": {
                "n_ctx": state.engine.n_ctx(),
                "n_ctx_train": model.n_ctx_train(),
                "n_params": model.n_params(),
                "size": model.size_bytes(),
            },
        }],
        "has_more": false,
    }))
}
