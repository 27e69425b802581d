//! A Gemma 4 checkpoint directory loaded for text generation: config, generation config,
//! tokenizer, chat template and the text decoder. The thin top level that the CLI uses;
//! every piece is also usable on its own.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::chat::{ChatTemplate, Message};
use crate::config::{Architecture, GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::text_model::TextModel;
use crate::tokenizer::Tokenizer;
use crate::weights::{Checkpoint, ProgressFn, Weights};

/// How to load a checkpoint.
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Called with (bytes loaded, bytes expected) while weights are read.
    pub progress: Option<ProgressFn>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            progress: None,
        }
    }
}

/// A prompt as a user gives it.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text; a BOS is put in front when the tokenizer did not add one (Gemma degrades
    /// badly without it).
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
    /// Messages rendered through the chat template, with the model's turn opened.
    Chat(Vec<Message>),
}

/// Name prefix of the text decoder's tensors for an architecture.
pub fn text_prefix(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Gemma4 | Architecture::Gemma4Unified => "model.language_model.",
        Architecture::Gemma4Text => "model.",
    }
}

pub struct Gemma4 {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub generation_config: GenerationConfig,
    pub text: TextModel,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: ChatTemplate,
}

impl Gemma4 {
    /// Loads the text side of checkpoint `dir` (vision and audio weights are not read).
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.exists() {
            GenerationConfig::from_file(&gen_path)?
        } else {
            GenerationConfig::default()
        };
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Tokenizer::from_dir(dir)?)
        } else {
            None
        };
        let chat_template = ChatTemplate::from_dir(dir)?;
        let mut ckpt = Checkpoint::open(dir)?;
        let prefix = text_prefix(config.architecture);
        if let Some(p) = opts.progress {
            let total = ckpt.bytes_under(prefix);
            ckpt.set_progress(total, p);
        }
        let w = Weights::new(&ckpt, prefix, opts.dtype, &opts.device);
        let text = TextModel::new(&config.text, &w)?;
        Ok(Gemma4 {
            dir: dir.to_path_buf(),
            config,
            generation_config,
            text,
            tokenizer,
            chat_template,
        })
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::io(
                self.dir.join("tokenizer.json"),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer: text prompts need tokenizer.json",
                ),
            )
        })
    }

    /// Every id that ends generation: the generation config's EOS ids and the model config's.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = self.generation_config.eos_token_ids.clone();
        ids.extend(&self.config.eos_token_ids);
        ids.extend(&self.config.text.eos_token_ids);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Token ids of a prompt.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let vocab = self.config.text.vocab_size;
        let ids = match prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(text) => {
                let mut ids = self.tokenizer()?.encode(text)?;
                let bos = self.config.text.bos_token_id;
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
                ids
            }
            Prompt::Chat(messages) => {
                let rendered = self.chat_template.render(messages, true)?;
                // The template writes `<bos>` itself: encode without adding special tokens.
                self.tokenizer()?.encode_raw(&rendered)?
            }
        };
        if ids.is_empty() {
            return Err(Error::invalid_argument("prompt", "is empty"));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::invalid_argument(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(ids)
    }
}

/// Parameters stored per tower, counted from the checkpoint's tensor shapes (nothing loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParameterCounts {
    pub text: u64,
    pub vision: u64,
    pub audio: u64,
    pub other: u64,
}

impl ParameterCounts {
    pub fn of(ckpt: &Checkpoint, arch: Architecture) -> Self {
        let text = text_prefix(arch);
        let mut c = ParameterCounts::default();
        for name in ckpt.tensor_names() {
            let n: u64 = ckpt
                .shape(name)
                .map(|s| s.iter().map(|&d| d as u64).product())
                .unwrap_or(0);
            let slot = if name.starts_with(text) {
                &mut c.text
            } else if name.starts_with("model.vision") || name.starts_with("model.embed_vision") {
                &mut c.vision
            } else if name.starts_with("model.audio") || name.starts_with("model.embed_audio") {
                &mut c.audio
            } else {
                &mut c.other
            };
            *slot += n;
        }
        c
    }

    pub fn total(&self) -> u64 {
        self.text + self.vision + self.audio + self.other
    }
}
