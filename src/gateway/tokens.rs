//! Counting a request's tokens before it is sent, to reserve them: the
//! model family's tokenizer from `tiktoken-rs` (o200k for the GPT-4o, 4.1
//! and o-series families, cl100k for GPT-4, 3.5 and the embedding models).
//! Models it does not know (Llama, Mistral, … behind vLLM or Ollama) are
//! counted with o200k as an estimate: tokenizers of that size split English
//! within a few percent of each other, and the commit charges what the
//! upstream reports anyway.

use serde_json::Value;
use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
use tiktoken_rs::CoreBPE;

/// OpenAI's accounting for chat: each message costs 3 tokens of framing,
/// a `name` one more, and the reply is primed with 3.
const PER_MESSAGE: u64 = 3;
const PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// The tokenizer for `model` (o200k when the model is unknown).
fn bpe(model: &str) -> &'static CoreBPE {
    match get_tokenizer(model) {
        Some(Tokenizer::Cl100kBase) => tiktoken_rs::cl100k_base_singleton(),
        _ => tiktoken_rs::o200k_base_singleton(),
    }
}

/// Tokens of `text` for `model`.
pub fn count_text(model: &str, text: &str) -> u64 {
    bpe(model).encode_ordinary(text).len() as u64
}

/// The text parts of a message's `content`: a string, or an array of parts
/// of which the `text` ones count (images and audio are not counted here;
/// the upstream's usage charges them at commit).
fn content_text(content: &Value, out: &mut String) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        _ => {}
    }
}

/// Prompt tokens of a chat request's `messages` (and `tools`, counted as
/// their JSON text).
pub fn count_chat(model: &str, body: &Value) -> u64 {
    let bpe = bpe(model);
    let mut n = REPLY_PRIMING;
    let mut text = String::new();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            n += PER_MESSAGE;
            if let Some(role) = m.get("role").and_then(Value::as_str) {
                text.push_str(role);
            }
            if let Some(c) = m.get("content") {
                content_text(c, &mut text);
            }
            if let Some(name) = m.get("name").and_then(Value::as_str) {
                n += PER_NAME;
                text.push_str(name);
            }
            if let Some(calls) = m.get("tool_calls") {
                text.push_str(&calls.to_string());
            }
            text.push('\n');
        }
    }
    if let Some(tools) = body.get("tools") {
        text.push_str(&tools.to_string());
    }
    n + bpe.encode_ordinary(&text).len() as u64
}

/// Input tokens of an embeddings request: `input` is a string, an array of
/// strings, or (already tokenized) an array of token ids or of such arrays.
pub fn count_embeddings(model: &str, body: &Value) -> u64 {
    let bpe = bpe(model);
    match body.get("input") {
        Some(Value::String(s)) => bpe.encode_ordinary(s).len() as u64,
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => bpe.encode_ordinary(s).len() as u64,
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_match_the_tokenizers() {
        // "hello world" is two tokens in both o200k and cl100k.
        assert_eq!(count_text("gpt-4o", "hello world"), 2);
        assert_eq!(count_text("gpt-4", "hello world"), 2);
        assert_eq!(count_text("llama3", "hello world"), 2);
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        // 3 priming + 3 framing + "user" (1) + "hello world" (2) + "\n" (1).
        assert_eq!(
            count_chat("gpt-4o", &body),
            3 + 3 + count_text("gpt-4o", "userhello world\n")
        );
        let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]});
        assert_eq!(count_chat("gpt-4o", &parts), count_chat("gpt-4o", &body));
        assert_eq!(
            count_embeddings("text-embedding-3-small", &json!({"input": ["hello world", "hello"]})),
            3
        );
        assert_eq!(count_embeddings("x", &json!({"input": [[1, 2, 3], [4]]})), 4);
    }
}
