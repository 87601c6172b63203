//! Turning a request into the token ids its engine computes, so its blocks can be matched
//! against the engine's KV events.
//!
//! - `huggingface`: the model's `tokenizer.json` (the `tokenizers` crate). Chat requests are
//!   first rendered with the model's chat template (`chat_template` of a
//!   `tokenizer_config.json`, or a `.jinja` file), with `add_generation_prompt`, and encoded
//!   without special tokens — vLLM's way; completions are encoded with them. A template that
//!   does not render (this engine supports the Jinja subset most templates use) falls back
//!   to the flattened prompt, and is logged once.
//! - `sim`: the simulated worker's tokens (each 4 bytes of prompt, little-endian).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use epp_core::Request;
use serde::Deserialize;
use tracing::warn;

/// The `tokenizer` parameter of `precise-prefix-cache-producer`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenizerParams {
    /// `huggingface` (default) or `sim`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `tokenizer.json`.
    pub path: Option<PathBuf>,
    /// `tokenizer_config.json` (its `chat_template`) or a Jinja file.
    pub chat_template: Option<PathBuf>,
}

pub enum Tokenizer {
    Sim,
    HuggingFace { tokenizer: Box<tokenizers::Tokenizer>, template: Option<Box<ChatTemplate>>, warned: AtomicBool },
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Sim => f.write_str("Tokenizer::Sim"),
            Tokenizer::HuggingFace { template, .. } => {
                write!(f, "Tokenizer::HuggingFace(chat template: {})", template.is_some())
            }
        }
    }
}

impl Tokenizer {
    /// Loads what `params` names; `base` resolves relative paths.
    pub fn load(params: &TokenizerParams, base: Option<&Path>) -> Result<Tokenizer, String> {
        let resolve = |p: &Path| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        };
        match params.kind.as_deref().unwrap_or("huggingface") {
            "sim" => Ok(Tokenizer::Sim),
            "huggingface" => {
                let path = params.path.as_deref().map(resolve).ok_or(
                    "tokenizer.path: the model's tokenizer.json is needed (or `type: sim` for simulated workers)",
                )?;
                let tokenizer = tokenizers::Tokenizer::from_file(&path)
                    .map_err(|e| format!("tokenizer.path: cannot load {}: {e}", path.display()))?;
                let template = match params.chat_template.as_deref().map(resolve) {
                    Some(p) => Some(Box::new(ChatTemplate::load(&p)?)),
                    None => None,
                };
                Ok(Tokenizer::HuggingFace { tokenizer: Box::new(tokenizer), template, warned: AtomicBool::new(false) })
            }
            other => Err(format!("tokenizer.type: `{other}`; expected huggingface or sim")),
        }
    }

    /// A tokenizer from `tokenizer.json` text (tests build small ones).
    pub fn from_json(json: &str) -> Result<Tokenizer, String> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| e.to_string())?;
        Ok(Tokenizer::HuggingFace { tokenizer: Box::new(tokenizer), template: None, warned: AtomicBool::new(false) })
    }

    /// Whether it runs a model's tokenizer (costly per byte), not the simulator's.
    pub fn is_model(&self) -> bool {
        matches!(self, Tokenizer::HuggingFace { .. })
    }

    /// Whether it renders chat requests through the model's chat template (and so needs
    /// their `messages` as sent).
    pub fn renders_chat(&self) -> bool {
        matches!(self, Tokenizer::HuggingFace { template: Some(_), .. })
    }

    /// The request's token ids.
    pub fn encode(&self, req: &Request) -> Vec<u32> {
        match self {
            Tokenizer::Sim => sim::kv_cache::pseudo_tokens(req.prompt.as_bytes(), usize::MAX / 8, 4),
            Tokenizer::HuggingFace { tokenizer, template, warned } => {
                let rendered = match (template, &req.messages) {
                    (Some(t), Some(messages)) => match t.render(messages) {
                        Ok(text) => Some(text),
                        Err(e) => {
                            if !warned.swap(true, Ordering::Relaxed) {
                                warn!(error = %e, "the chat template does not render here; chat prompts are tokenized as flattened text");
                            }
                            None
                        }
                    },
                    _ => None,
                };
                let (text, special) = match &rendered {
                    Some(t) => (t.as_str(), false),
                    None => (req.prompt.as_str(), true),
                };
                tokenizer.encode_fast(text, special).map(|e| e.get_ids().to_vec()).unwrap_or_default()
            }
        }
    }
}

impl ChatTemplate {
    fn load(path: &Path) -> Result<ChatTemplate, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("tokenizer.chatTemplate: cannot read {}: {e}", path.display()))?;
        let (source, bos, eos) = if path.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("tokenizer.chatTemplate: {}: {e}", path.display()))?;
            let token = |k: &str| match v.get(k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Object(o)) => {
                    o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string()
                }
                _ => String::new(),
            };
            let template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => s.clone(),
                // A list of named templates: the default one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template").and_then(|x| x.as_str()))
                    .unwrap_or_default()
                    .to_string(),
                _ => return Err(format!("tokenizer.chatTemplate: {} has no chat_template", path.display())),
            };
            (template, token("bos_token"), token("eos_token"))
        } else {
            (text, String::new(), String::new())
        };
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| format!("tokenizer.chatTemplate: {}: {e}", path.display()))?;
        Ok(ChatTemplate { env, bos, eos })
    }

    fn render(&self, messages_json: &str) -> Result<String, String> {
        let messages: serde_json::Value = serde_json::from_str(messages_json).map_err(|e| e.to_string())?;
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from_serialize(&messages),
                add_generation_prompt => true,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
            })
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer small enough to write by hand.
    pub const TINY: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "user": 3, ":": 4, "hi": 5}, "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn huggingface_tokenizers_and_chat_templates() {
        let t = Tokenizer::from_json(TINY).unwrap_or_else(|e| panic!("{e}"));
        let req = Request { prompt: "hello world hello".into(), ..Default::default() };
        assert_eq!(t.encode(&req), vec![1, 2, 1]);
        assert!(t.is_model() && !t.renders_chat(), "no chat template: chat requests need no messages");
        assert!(!Tokenizer::Sim.renders_chat());
        let dir = std::env::temp_dir().join(format!("epp-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("tokenizer.json"), TINY).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "hello", "chat_template": "{{ bos_token }}{% for m in messages %} {{ m.role }} : {{ m.content }}{% endfor %}{% if add_generation_prompt %} world{% endif %}"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let params = TokenizerParams {
            kind: None,
            path: Some("tokenizer.json".into()),
            chat_template: Some("tokenizer_config.json".into()),
        };
        let t = Tokenizer::load(&params, Some(&dir)).unwrap_or_else(|e| panic!("{e}"));
        assert!(t.renders_chat(), "a chat template needs the messages as sent");
        let chat = Request {
            prompt: "user: hi".into(),
            messages: Some(r#"[{"role":"user","content":"hi"}]"#.into()),
            ..Default::default()
        };
        assert_eq!(t.encode(&chat), vec![1, 3, 4, 5, 2], "bos, user : hi, generation prompt");
        let e = Tokenizer::load(&TokenizerParams { path: Some("nope.json".into()), ..Default::default() }, Some(&dir))
            .unwrap_err();
        assert!(e.contains("tokenizer.path") && e.contains("nope.json"), "{e}");
        assert!(Tokenizer::load(&TokenizerParams::default(), None).unwrap_err().contains("tokenizer.json is needed"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sim_tokens_are_four_bytes_each() {
        let req = Request { prompt: "abcdefgh!".into(), ..Default::default() };
        assert_eq!(Tokenizer::Sim.encode(&req), vec![u32::from_le_bytes(*b"abcd"), u32::from_le_bytes(*b"efgh")]);
    }
}
