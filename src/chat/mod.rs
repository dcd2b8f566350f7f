//! Requests to prompt text: the protocol-neutral conversation that every API
//! module converts its wire messages into, and the chat template that renders
//! it for the model.

pub mod reasoning;
pub mod template;
pub mod tools;

use serde::Serialize;

/// Who said a message. Protocol modules map their own role names onto these
/// (OpenAI `developer` becomes `System`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation, its content already flattened to text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}
