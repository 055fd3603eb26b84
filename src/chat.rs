//! Chat templates: a model's own Jinja template (from a GGUF file's `tokenizer.chat_template`,
//! or a folder's `chat_template.jinja` or `tokenizer_config.json` `chat_template`) rendered
//! with minijinja the way transformers' `apply_chat_template` renders it, so that a chat prompt
//! gives the same text, and after tokenizing without added special tokens the same ids.
//!
//! transformers' conventions (`utils/chat_template_utils.py`), reproduced here:
//! - `trim_blocks` and `lstrip_blocks` on, no kept trailing newline;
//! - the context: `messages` (a list of `{role, content}`), `add_generation_prompt`, and the
//!   special token strings `bos_token`, `eos_token` (`unk_token`, `pad_token` when known);
//! - `raise_exception(message)` fails the rendering with the template's message;
//! - `tojson` as Python's `json.dumps(x, ensure_ascii=False)` (`", "` and `": "` separators,
//!   no HTML escaping; `indent` and `sort_keys` honoured);
//! - loop controls (`break`, `continue`), `namespace`, `dict`, and Python string/dict methods
//!   (`.strip()`, `.startswith()`, `.items()`, …; minijinja-contrib's pycompat).

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{PeftError, Result};
use crate::io::gguf::GgufMetadata;
use crate::io::source::{ModelSource, SourceKind};

/// A folder's standalone chat template file (transformers ≥ 4.43 writes it).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// A folder's tokenizer settings, whose `chat_template` field older exports use.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (the template decides what it accepts).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's chat template with the special token strings it is rendered with.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
}

impl ChatTemplate {
    /// A template from its Jinja `source`; `origin` names where it came from in errors. A
    /// template that does not parse is an error naming the origin and the line.
    pub fn new(source: &str, origin: &str) -> Result<Self> {
        let template = Self {
            source: source.to_string(),
            origin: origin.to_string(),
            bos_token: None,
            eos_token: None,
            unk_token: None,
            pad_token: None,
        };
        environment()
            .template_from_str(&template.source)
            .map_err(|e| template.error(e))?;
        Ok(template)
    }

    /// Sets the `bos_token` and `eos_token` strings the template sees.
    pub fn with_special_tokens(mut self, bos: Option<&str>, eos: Option<&str>) -> Self {
        self.bos_token = bos.map(str::to_string);
        self.eos_token = eos.map(str::to_string);
        self
    }

    /// The template of a GGUF file (`tokenizer.chat_template`, with the file's BOS/EOS/UNK/PAD
    /// token strings), or `None` when the file has none.
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Option<Self>> {
        let Some(source) = meta.chat_template() else {
            return Ok(None);
        };
        let origin = format!("{} (tokenizer.chat_template)", meta.path().display());
        let mut t = Self::new(source, &origin)?;
        let cfg = meta.tokenizer_config_json()?;
        let token = |name: &str| cfg.get(name).and_then(special_token_string);
        t.bos_token = token("bos_token");
        t.eos_token = token("eos_token");
        t.unk_token = token("unk_token");
        t.pad_token = token("pad_token");
        Ok(Some(t))
    }

    /// The template of a Hugging Face folder: `chat_template.jinja`, else the `chat_template`
    /// of `tokenizer_config.json` (a string, or a list of named templates of which `default` is
    /// taken); the special token strings come from `tokenizer_config.json`. `None` when the
    /// folder has neither. An unreadable or malformed file is an error naming it.
    pub fn from_folder(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: Option<serde_json::Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| PeftError::io(&config_path, e))?;
            Some(serde_json::from_str(&text).map_err(|e| {
                PeftError::config(
                    config_path.display().to_string(),
                    format!("invalid JSON: {e}"),
                )
            })?)
        } else {
            None
        };
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        let mut template = if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| PeftError::io(&jinja, e))?;
            Self::new(&source, &jinja.display().to_string())?
        } else {
            let field = config.as_ref().and_then(|c| c.get("chat_template"));
            let origin = format!("{} (chat_template)", config_path.display());
            match field {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => Self::new(s, &origin)?,
                Some(serde_json::Value::Array(named)) => {
                    let default = named.iter().find(|t| t["name"] == "default");
                    match default.and_then(|t| t["template"].as_str()) {
                        Some(s) => Self::new(s, &origin)?,
                        None => {
                            return Err(PeftError::config(
                                origin,
                                "a list of named templates without a `default` one",
                            ));
                        }
                    }
                }
                Some(other) => {
                    return Err(PeftError::config(
                        origin,
                        format!("expected a string, got {other}"),
                    ));
                }
            }
        };
        if let Some(cfg) = &config {
            let token = |name: &str| cfg.get(name).and_then(special_token_string);
            template.bos_token = token("bos_token");
            template.eos_token = token("eos_token");
            template.unk_token = token("unk_token");
            template.pad_token = token("pad_token");
        }
        Ok(Some(template))
    }

    /// The template of a model source (GGUF file or folder). A model without one is an error
    /// naming the model and where the template was looked for.
    pub fn for_source(src: &ModelSource) -> Result<Self> {
        let (found, looked) = if src.kind == SourceKind::Gguf {
            let meta = GgufMetadata::open(&src.config)?;
            (
                Self::from_gguf(&meta)?,
                format!("`tokenizer.chat_template` in {}", src.config.display()),
            )
        } else {
            (
                Self::from_folder(&src.dir)?,
                format!(
                    "{CHAT_TEMPLATE_FILE} or `chat_template` in {TOKENIZER_CONFIG_FILE} of {}",
                    src.dir.display()
                ),
            )
        };
        found.ok_or_else(|| {
            PeftError::Unsupported(format!(
                "model `{}` has no chat template (no {looked}); it is a base model or its \
                 template was not shipped: use plain prompts",
                src.spec
            ))
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (a file, and the key within it).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages`; `add_generation_prompt` appends the opening of the assistant's turn.
    /// A template error (`raise_exception`, an unknown method, a syntax error) names the origin.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| self.error(e))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            unk_token => self.unk_token,
            pad_token => self.pad_token,
        };
        template.render(ctx).map_err(|e| self.error(e))
    }

    /// A single user turn followed by the opening of the assistant's: what a model is asked.
    pub fn render_prompt(&self, prompt: &str) -> Result<String> {
        self.render(&[ChatMessage::new("user", prompt)], true)
    }

    /// A user turn and the assistant's answer, split into the prompt part (the user turn and
    /// the assistant turn's opening, as [`render_prompt`](Self::render_prompt) gives it) and
    /// the answer part (the rest of the conversation's rendering). A template that renders the
    /// user turn differently inside the conversation is an error: the split would be wrong.
    pub fn render_pair(&self, prompt: &str, response: &str) -> Result<(String, String)> {
        let head = self.render_prompt(prompt)?;
        let full = self.render(
            &[
                ChatMessage::new("user", prompt),
                ChatMessage::new("assistant", response),
            ],
            false,
        )?;
        match full.strip_prefix(&head) {
            Some(tail) => Ok((head, tail.to_string())),
            None => Err(PeftError::Unsupported(format!(
                "chat template {}: the conversation does not start with the rendered prompt \
                 (user turn + generation prompt), so the response's tokens cannot be told apart",
                self.origin
            ))),
        }
    }

    fn error(&self, e: Error) -> PeftError {
        PeftError::config(format!("chat template {}", self.origin), format!("{e:#}"))
    }
}

/// A special token as `tokenizer_config.json` writes it: a string, or an `AddedToken` object
/// with `content`.
fn special_token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The environment transformers compiles templates in (see the module docs).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    if ensure_ascii == Some(true) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson(ensure_ascii=True) is not supported",
        ));
    }
    let mut out = String::new();
    write_json(&mut out, &value, indent, sort_keys.unwrap_or(false), 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // Python's separators: ", " without indent, "," with it (the newline follows).
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&if f.is_nan() {
                    "NaN".to_string()
                } else if f.is_infinite() {
                    if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
                } else {
                    format!("{f:?}")
                });
            }
        }
        ValueKind::String => out.push_str(&json_string(v.as_str().unwrap_or_default())),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                out.push_str(&json_string(&key));
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => out.push_str(&json_string(&v.to_string())),
    }
    Ok(())
}

/// A JSON string literal with Python's escapes (`"`, `\`, control characters; non-ASCII kept).
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_conventions() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {% if m.role == 'system' %}{% continue %}{% endif %}\n\
             [{{ m.role | upper }}] {{ m.content.strip() }}{{ eos_token }}\n{% endfor %}\n\
             {{ {'a': 1, 'b': [1.5, 'é<>'], 'c': none} | tojson }}",
            "test",
        )
        .unwrap()
        .with_special_tokens(Some("<s>"), Some("</s>"));
        let out = t
            .render(
                &[
                    ChatMessage::new("system", "hidden"),
                    ChatMessage::new("user", "  hi  "),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "[USER] hi</s>\n{\"a\": 1, \"b\": [1.5, \"é<>\"], \"c\": null}"
        );
        let bad = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "bad.jinja")
            .unwrap();
        let err = bad.render(&[], false).unwrap_err().to_string();
        assert!(
            err.contains("roles must alternate") && err.contains("bad.jinja"),
            "{err}"
        );
        assert!(ChatTemplate::new("{% for %}", "broken.jinja").is_err());
    }
}
