//! Constrained decoding: an answer held to a JSON schema (OpenAI's `response_format`
//! `json_object` / `json_schema`), by llguidance, the grammar engine llama.cpp and
//! mistral.rs use. Before each token is sampled, every token the grammar cannot take next
//! gets a logit of −∞; the stop ids are allowed exactly where the grammar may end.
//!
//! llguidance works on a trie of every token's bytes. We build it from the checkpoint's
//! own tokenizer ([`ConstraintCompiler::new`]): a token's bytes are what the decoder makes
//! of it alone (`▁` → space), a byte-fallback token `<0xHH>` is that byte, and special
//! tokens (markers such as `<|tool_call>`) are marked so that no grammar ever admits them
//! as text.
//!
//! With thinking on, the model may open its thought channel first: a constraint made
//! [`Constraint::after_reasoning`] lets the thought run free and holds only what follows
//! it, as vLLM's structured outputs do with a reasoning parser.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::prompt::tokenizer::Tokenizer;

/// What an answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid under this schema (the `schema` of OpenAI's `json_schema` format).
    JsonSchema(Value),
}

impl ResponseFormat {
    /// llguidance's grammar for the format. JSON is written compactly unless the schema
    /// says otherwise in its `x-guidance` options: `, ` and `: ` between items, and no
    /// other whitespace (llguidance's default, free whitespace everywhere, lets a model
    /// pad its answer with blank lines until `max_tokens` runs out).
    fn grammar(&self) -> Result<TopLevelGrammar> {
        let mut schema = match self {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema(s) => s.clone(),
        };
        match &mut schema {
            Value::Object(map) => {
                if !map.contains_key("x-guidance") {
                    map.insert(
                        "x-guidance".into(),
                        serde_json::json!({
                            "whitespace_flexible": false,
                            "item_separator": ", ",
                            "key_separator": ": ",
                        }),
                    );
                }
            }
            Value::Bool(_) => {}
            _ => {
                return Err(Error::invalid_argument(
                    "response_format",
                    "the JSON schema must be an object or a boolean",
                ))
            }
        }
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

/// The checkpoint's vocabulary as llguidance sees it. Its own tokenization is the
/// trie's greedy one, flagged non-canonical, so llguidance never forces tokens from it:
/// only masks are used.
struct Vocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Compiles response formats into [`Constraint`]s for one checkpoint's tokenizer. Made
/// once (building the trie of a 262k vocabulary takes a moment) and shared.
#[derive(Clone)]
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    vocab: usize,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl ConstraintCompiler {
    /// For `tokenizer`'s vocabulary, `vocab` ids wide (the model's logits; ids past the
    /// tokenizer's are never allowed). `end` is the id llguidance treats as the end of
    /// the answer; every stop id of a sequence then counts as it.
    pub fn new(tokenizer: &Tokenizer, vocab: usize, end: u32) -> Result<Self> {
        let words = token_bytes(tokenizer, vocab)?;
        let mut info = TokRxInfo::new(vocab as u32, end);
        info.tok_end_of_turn = Some(end);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| Error::Constraint(e.to_string()))?;
        // llguidance logs grammar warnings to stderr by default; they reach the caller
        // as errors instead.
        factory.quiet();
        Ok(ConstraintCompiler {
            factory: Arc::new(factory),
            vocab,
        })
    }

    /// A fresh constraint for `format`. Schemas llguidance cannot compile (or that exceed
    /// its size limits) are an error naming `response_format`.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(format.grammar()?)
            .map_err(|e| Error::invalid_argument("response_format", e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::invalid_argument("response_format", e));
        }
        Ok(Constraint {
            matcher,
            end: self.factory.tok_env().tok_trie().eos_token(),
            reasoning: None,
            phase: Phase::Start,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }
}

/// Every id's bytes for the trie: what the decoder makes of the token alone, the byte of
/// a byte-fallback token, `0xFF` + the content for special tokens, nothing past the
/// tokenizer's vocabulary.
fn token_bytes(tokenizer: &Tokenizer, vocab: usize) -> Result<Vec<Vec<u8>>> {
    let special = tokenizer.special_ids();
    let mut words = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        let Some(piece) = tokenizer.id_to_token(id) else {
            words.push(Vec::new());
            continue;
        };
        if special.contains(&id) {
            let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            w.extend_from_slice(piece.as_bytes());
            words.push(w);
        } else if let Some(b) = byte_fallback(&piece) {
            words.push(vec![b]);
        } else {
            words.push(tokenizer.decode(&[id], false)?.into_bytes());
        }
    }
    Ok(words)
}

/// The byte of a byte-fallback piece, `<0xHH>`.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing generated yet: the thought channel may open.
    Start,
    /// Inside the thought: free.
    Thinking,
    /// The answer: held to the grammar.
    Answer,
    /// The grammar ended (at its end id, with no stop ids to end the sequence): free.
    After,
}

/// One answer's constraint: the grammar's state, advanced token by token.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The trie's end id: allowed in a mask where the grammar may end.
    end: TokenId,
    reasoning: Option<(u32, u32)>,
    phase: Phase,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("reasoning", &self.reasoning)
            .field("phase", &self.phase)
            .finish()
    }
}

impl Constraint {
    /// Lets the answer open with a thought (`open` … `close`, Gemma 4's `<|channel>` and
    /// `<channel|>`) that the grammar does not see.
    pub fn after_reasoning(mut self, open: u32, close: u32) -> Self {
        self.reasoning = Some((open, close));
        self
    }

    /// Sets the logit of every token the grammar does not allow next to −∞; `stop_ids`
    /// are allowed where the grammar may end.
    pub(crate) fn mask(&mut self, logits: &mut [f32], stop_ids: &[u32]) -> Result<()> {
        if matches!(self.phase, Phase::Thinking | Phase::After) {
            return Ok(());
        }
        let allowed = self.matcher.compute_mask_or_eos().map_err(grammar_error)?;
        let end = allowed.is_allowed(self.end);
        let open = match (self.phase, self.reasoning) {
            (Phase::Start, Some((open, _))) => Some(open),
            _ => None,
        };
        let mut any = false;
        for (id, logit) in logits.iter_mut().enumerate() {
            let id = id as u32;
            // Without stop ids (`ignore_eos`) the grammar's own end id marks the end.
            let ok = if stop_ids.contains(&id) || (stop_ids.is_empty() && id == self.end) {
                end
            } else {
                (id != self.end && allowed.is_allowed(id)) || open == Some(id)
            };
            if ok {
                any |= *logit > f32::NEG_INFINITY;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if !any {
            return Err(grammar_error("no token can continue the answer"));
        }
        Ok(())
    }

    /// Records the chosen token (stop ids end the answer and are not passed on).
    pub(crate) fn accept(&mut self, id: u32, stop_ids: &[u32]) -> Result<()> {
        match (self.phase, self.reasoning) {
            (Phase::Start, Some((open, _))) if id == open => {
                self.phase = Phase::Thinking;
                return Ok(());
            }
            (Phase::Thinking, Some((_, close))) => {
                if id == close {
                    self.phase = Phase::Answer;
                }
                return Ok(());
            }
            (Phase::After, _) => return Ok(()),
            _ => self.phase = Phase::Answer,
        }
        if stop_ids.contains(&id) {
            return Ok(());
        }
        if stop_ids.is_empty() && id == self.end && self.matcher.is_accepting().unwrap_or(false) {
            self.phase = Phase::After;
            return Ok(());
        }
        self.matcher.consume_token(id).map_err(grammar_error)
    }

    /// Whether what was accepted so far is a whole answer.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

fn grammar_error(e: impl std::fmt::Display) -> Error {
    Error::Constraint(e.to_string())
}
