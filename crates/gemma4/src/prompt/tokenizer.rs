//! Tokenizer: a checkpoint's `tokenizer.json` through the `tokenizers` crate, with the
//! pipeline transformers' `GemmaTokenizer` rebuilds around the file's vocabulary and
//! merges: normalizer `" " → "▁"` (no prefix space, no NFKC), pre-tokenizer
//! `Split(" ", merged_with_previous)`, BPE with byte fallback, decoder `"▁" → " "`, byte
//! fallback, fuse. Special tokens match verbatim before normalisation. The file's
//! post-processor is kept, so BOS is added exactly when the reference adds it; raw-text
//! prompts get their BOS from prompt building ([`crate::prompt`]).

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{catch_panic, printable, Error, Result};
use crate::limits::Limits;

/// `f` on the `tokenizers` crate, whose errors and panics (it panics on some malformed
/// files: a truncated decoder, a bad precompiled charsmap, a post-processor naming a
/// missing token) become an error naming the tokenizer's file.
fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> std::result::Result<T, tokenizers::Error>,
) -> Result<T> {
    let message = match catch_panic(f) {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(e)) => printable(&e.to_string()),
        Err(panic) => format!("the tokenizer failed: {panic}"),
    };
    Err(Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    })
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Longer text is refused before the tokenizer spends time and memory on it (a chat
    /// template can render tens of megabytes): [`Limits::max_prompt_bytes`].
    max_input_bytes: usize,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`; `dir/tokenizer_config.json` (optional) names the class.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found"),
            ));
        }
        let bytes = crate::loading::input::read_file(&path)?;
        let inner = guarded(&path, || tokenizers::Tokenizer::from_bytes(&bytes))?;
        let class = read_tokenizer_class(&dir.join("tokenizer_config.json"))?;
        Self::with_pipeline(inner, path, class.as_deref())
    }

    /// A tokenizer from the JSON of a `tokenizer.json` (a llama.cpp GGUF file's vocabulary,
    /// [`crate::loading::gguf::metadata::tokenizer_json`]); `origin` names it in errors.
    pub fn from_json(json: &serde_json::Value, origin: &Path) -> Result<Self> {
        let text = json.to_string();
        let inner = guarded(origin, || text.parse::<tokenizers::Tokenizer>())?;
        Self::with_pipeline(inner, origin.to_path_buf(), None)
    }

    /// Gemma's normalizer, pre-tokenizer and decoder around `inner`'s vocabulary, unless
    /// `class` names another tokenizer class.
    fn with_pipeline(
        mut inner: tokenizers::Tokenizer,
        path: PathBuf,
        class: Option<&str>,
    ) -> Result<Self> {
        if class.is_none_or(|c| c.starts_with("GemmaTokenizer")) {
            guarded(&path, || {
                let replace = Replace::new(" ", "\u{2581}")?;
                inner.with_normalizer(Some(NormalizerWrapper::Replace(replace)))?;
                let split = Split::new(
                    SplitPattern::String(" ".into()),
                    SplitDelimiterBehavior::MergedWithPrevious,
                    false,
                )?;
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Split(split)));
                let undo = Replace::new("\u{2581}", " ")?;
                inner.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
                    DecoderWrapper::Replace(undo),
                    DecoderWrapper::ByteFallback(ByteFallback::new()),
                    DecoderWrapper::Fuse(Fuse::new()),
                ]))));
                Ok(())
            })?;
        }
        Ok(Tokenizer {
            inner,
            path,
            max_input_bytes: Limits::DEFAULT.max_prompt_bytes,
        })
    }

    /// The most bytes of text one call tokenizes ([`Limits::max_prompt_bytes`]).
    pub fn with_max_input_bytes(mut self, bytes: usize) -> Self {
        self.max_input_bytes = bytes;
        self
    }

    /// Token ids of `text` as the reference's `tokenizer(text).input_ids`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text` without the post-processor's special tokens (as
    /// `apply_chat_template(tokenize=True)`).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    /// [`Self::encode_raw`] with each token's byte range in `text`.
    #[allow(clippy::type_complexity)]
    pub fn encode_raw_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        self.check_length(text)?;
        let enc = guarded(&self.path, || self.inner.encode(text, false))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    fn check_length(&self, text: &str) -> Result<()> {
        if text.len() > self.max_input_bytes {
            return Err(Error::invalid_argument(
                "prompt",
                format!(
                    "{} bytes of text, over {}",
                    text.len(),
                    crate::limits::named("max_prompt_bytes", self.max_input_bytes)
                ),
            ));
        }
        Ok(())
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.check_length(text)?;
        let enc = guarded(&self.path, || self.inner.encode(text, add_special_tokens))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        guarded(&self.path, || self.inner.decode(ids, skip_special_tokens))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids of the added tokens marked special (Gemma's markers and control tokens).
    pub fn special_ids(&self) -> std::collections::HashSet<u32> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn read_tokenizer_class(path: &Path) -> Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    let v = crate::error::read_json(path)?;
    Ok(v.get("tokenizer_class")
        .and_then(|c| c.as_str())
        .map(str::to_string))
}

/// Turns a growing list of generated ids into text pieces as they become printable:
/// byte-fallback tokens of one UTF-8 character are held back until it is complete.
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds `id`; returns the newly printable text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}
