//! Chat: conversations rendered with the model's own `chat_template` (a Jinja template from
//! `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`) through `minijinja`, or, when a
//! model has none, with Gemma's turn format (Gemma 3's template, built in):
//! `<bos><start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n`.
//!
//! For scoring, [`ChatFormat::tokens`] also says which tokens belong to the model's turns: the text a
//! model turn adds after the generation prompt (its content and `<end_of_turn>`, up to the trailing
//! newline the template writes after it), so that only those count towards a loss.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::{json, Value};

use super::tokenizer::Tokenizer;
use super::ModelError;

/// Gemma's turn format, used when a model folder has no template: Gemma 3's `chat_template` as published
/// with the instruction-tuned checkpoints (system turns are folded into the first user turn).
pub const GEMMA_TEMPLATE: &str = include_str!("gemma_chat_template.jinja");

/// Largest side file read for a template (templates are a few kB).
const MAX_TEMPLATE_FILE: u64 = 16 << 20;
/// Largest chat file read (it is held in memory with its token ids).
const MAX_CHAT_FILE: u64 = 1 << 30;
/// Template evaluation budget (minijinja "fuel"), so a hostile template cannot hang.
const FUEL: u64 = 10_000_000;

/// How a model's conversations become text.
#[derive(Debug, Clone)]
pub struct ChatFormat {
    template: String,
    /// Where the template came from (a file), `None` for the built-in Gemma format.
    source: Option<PathBuf>,
    bos_token: String,
    eos_token: String,
}

impl ChatFormat {
    /// The template of the model folder `dir`: `chat_template.jinja`, else `chat_template.json`'s
    /// `chat_template`, else `tokenizer_config.json`'s `chat_template` (a string, or a list of named
    /// templates of which `default` is used); Gemma's turn format when there is none.
    pub fn from_folder(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let token = |key: &str, default: &str| -> String {
            match config.as_ref().and_then(|c| c.get(key)) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or(default)
                    .to_string(),
                _ => default.to_string(),
            }
        };
        let (bos_token, eos_token) = (token("bos_token", "<bos>"), token("eos_token", "<eos>"));
        let jinja = dir.join("chat_template.jinja");
        let (template, source) = if let Some(text) = read_text(&jinja)? {
            (Some(text), jinja)
        } else {
            let json_path = dir.join("chat_template.json");
            match read_json(&json_path)? {
                Some(v) => (template_of(&v, &json_path)?, json_path),
                None => match &config {
                    Some(c) => (template_of(c, &config_path)?, config_path),
                    None => (None, config_path),
                },
            }
        };
        Ok(match template {
            Some(template) => Self {
                template,
                source: Some(source),
                bos_token,
                eos_token,
            },
            None => Self {
                source: None,
                ..Self::gemma()
            },
        })
    }

    /// Gemma's turn format.
    pub fn gemma() -> Self {
        Self {
            template: GEMMA_TEMPLATE.to_string(),
            source: None,
            bos_token: "<bos>".into(),
            eos_token: "<eos>".into(),
        }
    }

    /// A format from template text (for tests and callers that hold a template).
    pub fn from_template(template: &str, bos_token: &str) -> Self {
        Self {
            template: template.to_string(),
            source: Some(PathBuf::from("<template>")),
            bos_token: bos_token.into(),
            eos_token: "<eos>".into(),
        }
    }

    /// Where the template came from, for messages: a path, or "Gemma's turn format".
    pub fn describe(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => "Gemma's turn format".into(),
        }
    }

    /// The text of `messages` (objects with `role` and `content`). With `add_generation_prompt` it ends
    /// with the start of a model turn. A template that refuses a system message (Gemma 2's) gets it
    /// folded into the first user message, as Gemma 3's template does.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        match self.render_raw(messages, add_generation_prompt) {
            Err(e) if is_system(messages.first()) && messages.len() > 1 => {
                let folded = fold_system(messages);
                self.render_raw(&folded, add_generation_prompt)
                    .map_err(|_| e)
            }
            other => other,
        }
    }

    fn render_raw(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let err = |e: JinjaError| ModelError::Chat {
            origin: self.describe(),
            reason: match e.detail() {
                Some(d) => format!("the chat template fails: {d}"),
                None => format!("the chat template fails: {e}"),
            },
        };
        let template = env.template_from_str(&self.template).map_err(err)?;
        template
            .render(json!({
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
            }))
            .map_err(err)
    }

    /// The token ids of a whole conversation and, for each token, whether it belongs to a model turn
    /// (role `assistant` or `model`). Starts with `<bos>` (`bos`), whether or not the template writes it.
    pub fn tokens(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Value],
        bos: u32,
    ) -> Result<(Vec<u32>, Vec<bool>), ModelError> {
        let text = self.render(messages, false)?;
        // Byte spans of the model turns: what turn i adds after the generation prompt that precedes it.
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            if !matches!(role, "assistant" | "model") {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !text.starts_with(&through) {
                return Err(ModelError::Chat {
                    origin: self.describe(),
                    reason: format!(
                        "message {i}: the template does not render the conversation turn by turn (a prefix changes), so the model's turns cannot be told apart"
                    ),
                });
            }
            spans.push(before.len()..through.trim_end().len());
        }
        let (mut ids, offsets) = tokenizer.encode_with_offsets(&text)?;
        let mut counted: Vec<bool> = offsets
            .iter()
            .map(|&(start, end)| spans.iter().any(|s| s.contains(&start) && end <= s.end))
            .collect();
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
            counted.insert(0, false);
        }
        Ok((ids, counted))
    }
}

fn is_system(m: Option<&Value>) -> bool {
    m.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("system")
}

/// The messages with a leading system message folded into the first user message ("system\n\nuser").
fn fold_system(messages: &[Value]) -> Vec<Value> {
    let text = |m: &Value| match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    let system = text(&messages[0]);
    let mut rest: Vec<Value> = messages[1..].to_vec();
    if let Some(first) = rest.first_mut() {
        let user = text(first);
        first["content"] = Value::String(format!("{system}\n\n{user}"));
    }
    rest
}

/// The template in a parsed `tokenizer_config.json` or `chat_template.json`.
fn template_of(v: &Value, path: &Path) -> Result<Option<String>, ModelError> {
    match v.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(named)) => {
            let find = |name: &str| {
                named.iter().find_map(|t| {
                    (t.get("name").and_then(Value::as_str) == Some(name))
                        .then(|| t.get("template").and_then(Value::as_str))
                        .flatten()
                })
            };
            Ok(find("default").map(String::from))
        }
        Some(_) => Err(ModelError::Chat {
            origin: path.display().to_string(),
            reason: "\"chat_template\" must be a string or a list of named templates".into(),
        }),
    }
}

/// A side file's text, `None` when there is none.
fn read_text(path: &Path) -> Result<Option<String>, ModelError> {
    read_bounded(path, MAX_TEMPLATE_FILE)
}

/// A file's text, `None` when there is none; at most `limit` bytes, regular files only (a FIFO or a
/// device would hang or never end).
fn read_bounded(path: &Path, limit: u64) -> Result<Option<String>, ModelError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io(path, e)),
    };
    if !meta.is_file() {
        return Err(ModelError::Chat {
            origin: path.display().to_string(),
            reason: "not a regular file".into(),
        });
    }
    if meta.len() > limit {
        return Err(ModelError::Chat {
            origin: path.display().to_string(),
            reason: format!("{} bytes is too large (at most {limit})", meta.len()),
        });
    }
    std::fs::read_to_string(path)
        .map(Some)
        .map_err(|e| ModelError::io(path, e))
}

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    match read_text(path)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Chat {
                origin: path.display().to_string(),
                reason: format!("not valid JSON: {e}"),
            }),
    }
}

/// The conversations of a JSONL file: one `{"messages": [{"role": ..., "content": ...}, ...]}` per
/// non-empty line. Errors name the file and line.
pub fn read_chat_file(path: &Path) -> Result<Vec<Vec<Value>>, ModelError> {
    let text = read_bounded(path, MAX_CHAT_FILE)?.ok_or_else(|| {
        ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        )
    })?;
    let bad = |line: usize, reason: String| ModelError::Chat {
        origin: format!("{}:{line}", path.display()),
        reason,
    };
    let mut conversations = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(n + 1, format!("not JSON: {e}")))?;
        let messages = v
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(n + 1, "expected {\"messages\": [...]}".into()))?;
        for (i, m) in messages.iter().enumerate() {
            let ok = m.get("role").is_some_and(Value::is_string)
                && m.get("content")
                    .is_some_and(|c| c.is_string() || c.is_array());
            if !ok {
                return Err(bad(
                    n + 1,
                    format!("message {i} needs a string \"role\" and a \"content\""),
                ));
            }
        }
        conversations.push(messages.clone());
    }
    if conversations.is_empty() {
        return Err(bad(1, "no conversations".into()));
    }
    Ok(conversations)
}

/// The messages of a one-turn chat: an optional system message, then the user's.
pub fn user_turn(system: Option<&str>, user: &str) -> Vec<Value> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(json!({"role": "system", "content": s}));
    }
    m.push(json!({"role": "user", "content": user}));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convo() -> Vec<Value> {
        vec![
            json!({"role": "user", "content": " Hi there "}),
            json!({"role": "assistant", "content": "Hello!"}),
            json!({"role": "user", "content": "Bye"}),
        ]
    }

    #[test]
    fn builtin_is_gemma_turn_format() {
        let f = ChatFormat::gemma();
        assert_eq!(
            f.render(&convo(), true).unwrap(),
            "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let sys = user_turn(Some("Be brief."), "Hi");
        assert_eq!(
            f.render(&sys, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn template_exceptions_are_errors_naming_the_template() {
        let f = ChatFormat::gemma();
        let bad = vec![json!({"role": "assistant", "content": "x"})];
        let e = f.render(&bad, false).unwrap_err().to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
        assert!(e.contains("Gemma's turn format"), "{e}");
        let broken = ChatFormat::from_template("{% for %}", "<bos>");
        assert!(broken.render(&convo(), false).is_err());
        // A template that loops forever runs out of fuel instead of hanging.
        let endless = ChatFormat::from_template(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "<bos>",
        );
        assert!(endless.render(&convo(), false).is_err());
    }
}
