//! Gemma 4's completion, read on token ids into what an OpenAI-style message holds:
//! `content`, `reasoning_content` (the thought channel) and `tool_calls`.
//!
//! The output format (the official chat template and transformers 5.23's response schema
//! for gemma4): a thought is `<|channel>thought\n … <channel|>`; a tool call is
//! `<|tool_call>call:NAME{…}<tool_call|>` with arguments in Gemma's object notation
//! ([`crate::prompt::object_notation`]); the message ends at `<turn|>`,
//! `<|tool_response>` (the model waits for the tool's answer) or `<eos>`.
//!
//! Markers are recognised as token ids, never by matching text, so a marker is never
//! half-seen and never reaches `content`; ordinary text that spells a marker out stays
//! text. Every other special token is dropped from the text. Quirks of the real models
//! are tolerated: an empty thought, a stray `<channel|>`, a repeated `<tool_call|>`, a
//! thought or call cut off by the token limit (the cut call is dropped; the finish reason
//! says `length`). Feed ids one at a time with [`OutputParser::push`] for streaming
//! deltas, or all at once with [`parse_output`].

use serde_json::Value;

use crate::error::{Error, Result};
use crate::prompt::object_notation::{parse_calls, Piece};
use crate::prompt::tokenizer::{StreamDecoder, Tokenizer};

/// Token ids of the output markers, looked up in the tokenizer by their text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Markers {
    pub channel_open: u32,
    pub channel_close: u32,
    pub tool_call_open: u32,
    pub tool_call_close: u32,
    pub quote: u32,
    pub turn_close: u32,
    pub tool_response_open: u32,
    pub eos: u32,
}

impl Markers {
    /// The ids that end the model's message: `<turn|>`, `<|tool_response>` (the model
    /// waits for the tool's answer) and `<eos>`. Generation stops at them.
    pub fn message_ends(&self) -> [u32; 3] {
        [self.turn_close, self.tool_response_open, self.eos]
    }

    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let id = |s: &str| {
            tok.token_to_id(s).ok_or_else(|| {
                Error::invalid_argument(
                    "tokenizer",
                    format!("has no `{s}` token: not a Gemma 4 vocabulary"),
                )
            })
        };
        Ok(Markers {
            channel_open: id("<|channel>")?,
            channel_close: id("<channel|>")?,
            tool_call_open: id("<|tool_call>")?,
            tool_call_close: id("<tool_call|>")?,
            quote: id("<|\"|>")?,
            turn_close: id("<turn|>")?,
            tool_response_open: id("<|tool_response>")?,
            eos: id("<eos>")?,
        })
    }
}

/// A tool call the model made; `arguments` is a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// A piece of the message as it is produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Content(String),
    Reasoning(String),
    /// A whole call, the `index`-th of the message (its arguments come in one piece).
    ToolCall {
        index: usize,
        call: ToolCall,
    },
}

/// The whole message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedMessage {
    pub content: String,
    pub reasoning_content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Content,
    /// Inside `<|channel>`; `header` while the channel name (`thought\n`) is being read.
    Thought {
        header: bool,
    },
    ToolCall,
    Done,
}

const THOUGHT_HEADER: &str = "thought\n";

/// Reads a completion token by token.
pub struct OutputParser<'a> {
    tok: &'a Tokenizer,
    m: Markers,
    state: State,
    text: StreamDecoder,
    /// Reasoning text held while the channel header may still be arriving.
    header: String,
    /// The current call's body: ids of ordinary text since the last delimiter, and the
    /// pieces before them.
    call_ids: Vec<u32>,
    call: Vec<Piece>,
    quotes: usize,
    message: ParsedMessage,
}

impl<'a> OutputParser<'a> {
    pub fn new(tok: &'a Tokenizer, markers: Markers) -> Self {
        OutputParser {
            tok,
            m: markers,
            state: State::Content,
            text: StreamDecoder::new(),
            header: String::new(),
            call_ids: Vec::new(),
            call: Vec::new(),
            quotes: 0,
            message: ParsedMessage::default(),
        }
    }

    /// Whether text read now would be `content` (not a thought or a call).
    pub fn in_content(&self) -> bool {
        self.state == State::Content
    }

    /// Whether an end marker (`<turn|>`, `<|tool_response>`, `<eos>`) was read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `id`; returns what it completed.
    pub fn push(&mut self, id: u32) -> Result<Vec<Delta>> {
        let m = self.m;
        let mut out = Vec::new();
        match self.state {
            State::Done => {}
            State::ToolCall => {
                // Inside a string every token is text (an odd number of delimiters read).
                let in_string = self.quotes % 2 == 1;
                if id == m.quote {
                    self.flush_call_text()?;
                    self.call.push(Piece::Quote);
                    self.quotes += 1;
                } else if id == m.tool_call_close && !in_string {
                    self.flush_call_text()?;
                    self.end_call(&mut out);
                } else if self.ends_message(id) && !in_string {
                    // A call the model never closed: dropped (it cannot be run).
                    self.reset_call();
                    self.state = State::Done;
                } else {
                    self.call_ids.push(id);
                }
            }
            State::Content | State::Thought { .. } => {
                if self.ends_message(id) {
                    self.flush_header(&mut out);
                    self.state = State::Done;
                } else if id == m.channel_open {
                    self.flush_header(&mut out);
                    self.text = StreamDecoder::new();
                    self.state = State::Thought { header: true };
                    self.message
                        .reasoning_content
                        .get_or_insert_with(String::new);
                } else if id == m.channel_close {
                    // Closes a thought; a stray one in content is dropped.
                    self.flush_header(&mut out);
                    self.text = StreamDecoder::new();
                    self.state = State::Content;
                } else if id == m.tool_call_open {
                    self.flush_header(&mut out);
                    self.text = StreamDecoder::new();
                    self.state = State::ToolCall;
                } else if id == m.tool_call_close || id == m.quote {
                    // A repeated `<tool_call|>` or a stray delimiter: not text.
                } else if let Some(piece) = self.text.push(self.tok, id)? {
                    self.text_piece(piece, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// Ends the completion (the token limit, or the last id read): a thought still open
    /// keeps what it has; a call still open is dropped.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        self.flush_header(&mut out);
        if self.state == State::ToolCall {
            self.reset_call();
        }
        self.state = State::Done;
        out
    }

    /// The message read so far.
    pub fn message(&self) -> &ParsedMessage {
        &self.message
    }

    fn ends_message(&self, id: u32) -> bool {
        self.m.message_ends().contains(&id)
    }

    fn text_piece(&mut self, piece: String, out: &mut Vec<Delta>) {
        match self.state {
            State::Thought { header: true } => {
                self.header.push_str(&piece);
                // Still a prefix of the header: wait for more.
                if THOUGHT_HEADER.starts_with(self.header.as_str()) && self.header != THOUGHT_HEADER
                {
                    return;
                }
                self.flush_header(out);
            }
            State::Thought { header: false } => self.reasoning(piece, out),
            _ => {
                if !piece.is_empty() {
                    self.message.content.push_str(&piece);
                    out.push(Delta::Content(piece));
                }
            }
        }
    }

    /// Emits held reasoning text, without the channel header.
    fn flush_header(&mut self, out: &mut Vec<Delta>) {
        if let State::Thought { header: true } = self.state {
            let held = std::mem::take(&mut self.header);
            let rest = held
                .strip_prefix(THOUGHT_HEADER)
                .or_else(|| held.strip_prefix("thought"))
                .unwrap_or(&held)
                .to_string();
            self.state = State::Thought { header: false };
            self.reasoning(rest, out);
        }
    }

    fn reasoning(&mut self, piece: String, out: &mut Vec<Delta>) {
        if piece.is_empty() {
            return;
        }
        self.message
            .reasoning_content
            .get_or_insert_with(String::new)
            .push_str(&piece);
        out.push(Delta::Reasoning(piece));
    }

    fn flush_call_text(&mut self) -> Result<()> {
        if !self.call_ids.is_empty() {
            let text = self.tok.decode(&self.call_ids, false)?;
            self.call_ids.clear();
            self.call.push(Piece::Text(text));
        }
        Ok(())
    }

    fn end_call(&mut self, out: &mut Vec<Delta>) {
        // A body that does not parse is dropped rather than shown as text: it is markup.
        if let Ok(calls) = parse_calls(&self.call) {
            for (name, arguments) in calls {
                let call = ToolCall { name, arguments };
                out.push(Delta::ToolCall {
                    index: self.message.tool_calls.len(),
                    call: call.clone(),
                });
                self.message.tool_calls.push(call);
            }
        }
        self.reset_call();
        self.state = State::Content;
    }

    fn reset_call(&mut self) {
        self.call.clear();
        self.call_ids.clear();
        self.quotes = 0;
    }
}

/// The message of a whole completion.
pub fn parse_output(tok: &Tokenizer, markers: Markers, ids: &[u32]) -> Result<ParsedMessage> {
    let mut p = OutputParser::new(tok, markers);
    for &id in ids {
        p.push(id)?;
        if p.is_done() {
            break;
        }
    }
    p.finish();
    Ok(p.message.clone())
}
