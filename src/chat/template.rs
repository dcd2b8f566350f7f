//! PLACEHOLDER until the real module lands (being written).
use super::ChatMessage;
#[derive(Debug, thiserror::Error)]
pub enum TemplateError { #[error("chat template syntax error: {0}")] Syntax(String), #[error("chat template failed: {0}")] Render(String) }
pub struct ChatTemplate { env: minijinja::Environment<'static>, src: String, bos: String, eos: String, fallback: bool, stops: Vec<String> }
impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true); env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |m: String| -> Result<String, minijinja::Error> { Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, m)) });
        env.add_template_owned("chat", source.to_string()).map_err(|e| TemplateError::Syntax(e.to_string()))?;
        Ok(Self { env, src: source.into(), bos: bos_token.into(), eos: eos_token.into(), fallback: false, stops: vec![] })
    }
    pub fn fallback(bos_token: &str, eos_token: &str) -> Self {
        let src = "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n{% elif m.role == 'user' %}User: {{ m.content }}\n\n{% else %}Assistant: {{ m.content }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";
        let mut t = Self::new(src, bos_token, eos_token).unwrap();
        t.fallback = true; t.stops = vec!["\nUser:".into()]; t
    }
    pub fn is_fallback(&self) -> bool { self.fallback }
    pub fn source(&self) -> &str { &self.src }
    pub fn fallback_stops(&self) -> &[String] { &self.stops }
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let t = self.env.get_template("chat").map_err(|e| TemplateError::Syntax(e.to_string()))?;
        t.render(minijinja::context! { messages => messages, add_generation_prompt => add_generation_prompt, bos_token => self.bos, eos_token => self.eos })
            .map_err(|e| TemplateError::Render(e.to_string()))
    }
}
