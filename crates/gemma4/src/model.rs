//! A Gemma 4 checkpoint directory loaded for generation: config, generation config,
//! tokenizer, chat template, processor settings, the text decoder and (when the checkpoint
//! has them) the image and audio encoders. The thin top level that the CLI uses; every piece is also
//! usable on its own.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::audio::decode::Audio;
use crate::audio::encoder::AudioEncoder;
use crate::audio::features::{AudioFeatureExtractor, AudioFeatures};
use crate::audio::resample::Resampler;
use crate::config::audio::AudioSpec;
use crate::config::{Architecture, GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::loading::weights::{Checkpoint, ProgressFn, Weights};
use crate::multimodal::{build_input, expand_prompt, MarkerStrings, ProcessedMedia, VisionEncoder};
use crate::prompt::chat::{ChatTemplate, Message};
use crate::prompt::tokenizer::Tokenizer;
use crate::quant::QuantType;
use crate::text::model::{PromptInput, TextModel};
use crate::vision::image_processor::{
    process_image, ImageProcessorConfig, PatchLayout, ProcessedImage, RgbImage,
};
use crate::vision::resize::ResizeKernel;
use crate::vision::video::{process_video, ProcessedVideo, Video, VideoProcessorConfig};

/// How to load a checkpoint.
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Called with (bytes loaded, bytes expected) while weights are read.
    pub progress: Option<ProgressFn>,
    /// Load the image encoder when the checkpoint has one.
    pub vision: bool,
    /// Load the audio encoder when the checkpoint has one.
    pub audio: bool,
    /// Block-quantize the text decoder's projections and tied embedding at load time
    /// (see [`crate::quant`]); the towers keep `dtype`.
    pub quant: Option<QuantType>,
    /// Bounds on untrusted input, kept in [`Gemma4::limits`]: the tokenizer and chat
    /// template use them, and the media loaders take them.
    pub limits: Limits,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            progress: None,
            vision: true,
            audio: true,
            quant: None,
            limits: Limits::DEFAULT,
        }
    }
}

/// Images, videos and audio clips that go with a prompt, in the order of their markers.
#[derive(Debug, Clone, Default)]
pub struct Media {
    pub images: Vec<RgbImage>,
    pub videos: Vec<Video>,
    pub audio: Vec<Audio>,
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
    /// Text a chat template rendered already ([`ChatTemplate::render_json`]): special
    /// tokens are written in it, so none is added.
    Rendered(String),
}

/// The dtype checkpoint `dir` computes in when none is asked for. A checkpoint holding
/// block-quantized tensors (`gemma4 quantize` output, a llama.cpp file) computes in f32:
/// its kernels take and give f32 rows, and activations between layers stay f32, as
/// llama.cpp's do. Otherwise what `from_pretrained` loads it in (transformers 5's
/// `dtype="auto"`): the config's `dtype` (or the older `torch_dtype`, at the top level
/// or in `text_config`), else the type the first dense tensor is stored in, else f32 —
/// bf16 for the released checkpoints.
pub fn default_dtype(dir: &Path) -> Result<DType> {
    let ckpt = Checkpoint::open(dir)?;
    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_unstable();
    let stored: Vec<_> = names
        .iter()
        .filter_map(|n| ckpt.stored_type(n).ok())
        .collect();
    if stored
        .iter()
        .any(|t| matches!(t, crate::loading::gguf::StoredType::Quant(_)))
    {
        return Ok(DType::F32);
    }
    let config_path = dir.join("config.json");
    if config_path.exists() {
        let v = crate::error::read_json(&config_path)?;
        let declared = ["dtype", "torch_dtype"].iter().find_map(|k| {
            v.get(k)
                .or_else(|| v.get("text_config").and_then(|t| t.get(k)))
                .and_then(serde_json::Value::as_str)
        });
        if let Some(name) = declared {
            return match name {
                "bfloat16" => Ok(DType::BF16),
                "float16" => Ok(DType::F16),
                "float32" => Ok(DType::F32),
                other => Err(Error::config(
                    &config_path,
                    format!("`dtype` {other:?} is not one of bfloat16, float16, float32"),
                )),
            };
        }
    }
    for t in stored {
        if let crate::loading::gguf::StoredType::Dense(
            t @ (DType::BF16 | DType::F16 | DType::F32),
        ) = t
        {
            return Ok(t);
        }
    }
    Ok(DType::F32)
}

/// The tokenizer of checkpoint `dir`: its `tokenizer.json`, else a llama.cpp file's
/// vocabulary; `None` when it has neither.
pub fn checkpoint_tokenizer(dir: &Path, ckpt: &Checkpoint) -> Result<Option<Tokenizer>> {
    Ok(
        match (
            dir.join("tokenizer.json").exists(),
            ckpt.llama_cpp_tokenizer(),
        ) {
            (true, _) => Some(Tokenizer::from_dir(dir)?),
            (false, Some(json)) => Some(Tokenizer::from_json(
                &json?,
                ckpt.single_file().unwrap_or(dir),
            )?),
            (false, None) => None,
        },
    )
}

/// The tokenizer of checkpoint directory `dir` alone, without its weights (see
/// [`checkpoint_tokenizer`]).
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let ckpt = Checkpoint::open(dir)?;
    checkpoint_tokenizer(dir, &ckpt)?.ok_or_else(|| {
        Error::io(
            dir.join("tokenizer.json"),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer"),
        )
    })
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
    /// Bytes the text decoder's weights occupy in memory (quantized where they are; the
    /// per-layer-embedding table, which stays on disk, excluded): what one decoding step
    /// streams, for a dense model.
    pub text_bytes: u64,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: ChatTemplate,
    pub vision: Option<VisionEncoder>,
    pub audio: Option<AudioEncoder>,
    /// Audio feature extractor settings (`processor_config.json`'s `feature_extractor`).
    pub audio_features: AudioFeatureExtractor,
    /// How clips at another rate are brought to the extractor's.
    pub resampler: Resampler,
    /// Image processor settings (`processor_config.json`), adjustable before use.
    pub image_processor: ImageProcessorConfig,
    pub video_processor: VideoProcessorConfig,
    /// Bounds on untrusted input ([`LoadOptions::limits`]). The tokenizer and chat template
    /// took theirs at load; the media loaders read these.
    pub limits: Limits,
    /// LoRA adapters attached to the text decoder ([`Self::attach_adapter`]), by id.
    pub(crate) adapters: Vec<crate::lora::AttachedAdapter>,
}

impl Gemma4 {
    /// Loads checkpoint `dir`: the text decoder, and the image and audio encoders when the
    /// checkpoint has them and `opts` asks for them.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let mut ckpt = Checkpoint::open(dir)?;
        let config = ModelConfig::for_checkpoint(dir, &ckpt)?;
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.exists() {
            GenerationConfig::from_file(&gen_path)?
        } else {
            GenerationConfig::default()
        };
        let tokenizer = checkpoint_tokenizer(dir, &ckpt)?
            .map(|t| t.with_max_input_bytes(opts.limits.max_prompt_bytes));
        let own_template = ["chat_template.jinja", "tokenizer_config.json"]
            .iter()
            .any(|f| dir.join(f).exists());
        let chat_template = match ckpt.llama_cpp_chat_template() {
            Some(src) if !own_template => ChatTemplate::from_source(
                Some(&src),
                "<bos>",
                "<eos>",
                &format!(
                    "{} `tokenizer.chat_template`",
                    ckpt.single_file().unwrap_or(dir).display()
                ),
                &opts.limits,
            )?,
            _ => ChatTemplate::from_dir_with(dir, &opts.limits)?,
        };
        let prefix = text_prefix(config.architecture);
        if let Some(p) = opts.progress {
            let total = ckpt.bytes_under(prefix);
            ckpt.set_progress(total, p);
        }
        let w = Weights::new(&ckpt, prefix, opts.dtype, &opts.device).with_quant(opts.quant);
        let text = TextModel::new(&config.text, &w)?;
        let text_bytes = ckpt.resident_bytes();
        let vision = match (&config.vision, opts.vision) {
            (Some(spec), true) => Some(VisionEncoder::load(
                spec,
                config.text.hidden_size,
                &ckpt,
                opts.dtype,
                &opts.device,
            )?),
            _ => None,
        };
        let audio = match (&config.audio, opts.audio) {
            (Some(spec), true) => Some(AudioEncoder::load(
                spec,
                config.text.hidden_size,
                &ckpt,
                opts.dtype,
                &opts.device,
            )?),
            _ => None,
        };
        let (image_processor, video_processor, audio_features) = processor_configs(dir, &config)?;
        Ok(Gemma4 {
            dir: dir.to_path_buf(),
            config,
            generation_config,
            text,
            text_bytes,
            tokenizer,
            chat_template,
            vision,
            audio,
            audio_features,
            resampler: Resampler::default(),
            image_processor,
            video_processor,
            limits: opts.limits,
            adapters: Vec::new(),
        })
    }

    /// Reads an image file (`-`: standard input) within [`Self::limits`].
    pub fn load_image(&self, path: &Path) -> Result<RgbImage> {
        crate::vision::image_processor::load_image_with(path, &self.limits)
    }

    /// Reads a video (an animated GIF or a directory of frames) within [`Self::limits`],
    /// keeping the frames the video processor samples.
    pub fn load_video(&self, path: &Path) -> Result<Video> {
        crate::vision::video::load_video(path, self.video_processor.num_frames, &self.limits)
    }

    /// Reads an audio file (`-`: standard input) within [`Self::limits`].
    pub fn load_audio(&self, path: &Path) -> Result<Audio> {
        crate::audio::decode::load_audio_with(path, &self.limits)
    }

    /// Resizes and patchifies images for this checkpoint's encoder.
    pub fn process_images(&self, images: &[RgbImage]) -> Result<Vec<ProcessedImage>> {
        images
            .iter()
            .map(|i| process_image(i, &self.image_processor))
            .collect()
    }

    pub fn process_videos(&self, videos: &[Video]) -> Result<Vec<ProcessedVideo>> {
        videos
            .iter()
            .map(|v| process_video(v, &self.video_processor))
            .collect()
    }

    /// Features of audio clips for this checkpoint's encoder (resampled as needed).
    pub fn process_audio(&self, clips: &[Audio]) -> Result<Vec<AudioFeatures>> {
        clips
            .iter()
            .map(|a| self.audio_features.extract_with(a, self.resampler))
            .collect()
    }

    /// `(kept, total)` seconds when the feature extractor will cut `clip` short (the
    /// conformer checkpoints keep the first 30 s, as the reference); `None` otherwise.
    pub fn audio_truncation(&self, clip: &Audio) -> Option<(f64, f64)> {
        let AudioFeatureExtractor::Mel(c) = &self.audio_features else {
            return None;
        };
        let total = clip.duration_s();
        let kept = c.max_samples() as f64 / c.sampling_rate as f64;
        (total > kept).then_some((kept, total))
    }

    /// Token strings of the multimodal markers, from the config's ids.
    pub fn markers(&self) -> Result<MarkerStrings> {
        let tok = self.tokenizer()?;
        let t = &self.config.mm_tokens;
        let s = |id: u32, what: &str| {
            tok.id_to_token(id).ok_or_else(|| {
                Error::invalid_argument(
                    "config.json",
                    format!("{what} token id {id} is not in the tokenizer"),
                )
            })
        };
        Ok(MarkerStrings {
            image: s(t.image, "image")?,
            video: s(t.video, "video")?,
            audio: s(t.audio, "audio")?,
            boi: s(t.boi, "begin-of-image")?,
            eoi: s(t.eoi, "end-of-image")?,
            boa: s(t.boa, "begin-of-audio")?,
            eoa: s(t.eoa, "end-of-audio")?,
        })
    }

    /// Every image, video and audio clip of `media` processed for its encoder.
    pub fn process_media(&self, media: &Media) -> Result<ProcessedMedia> {
        Ok(ProcessedMedia {
            images: self.process_images(&media.images)?,
            videos: self.process_videos(&media.videos)?,
            audio: self.process_audio(&media.audio)?,
        })
    }

    /// `text` with each media marker expanded to its item's soft tokens, as the processor
    /// does ([`expand_prompt`]: the markers must match the media in number). A
    /// checkpoint without the marker tokens takes text only.
    pub fn expand_markers(&self, text: &str, media: &ProcessedMedia) -> Result<String> {
        match (media.is_empty(), self.markers()) {
            (_, Ok(m)) => expand_prompt(text, &m, media),
            (true, Err(_)) => Ok(text.to_string()),
            (false, Err(e)) => Err(e),
        }
    }

    /// [`Self::prepare`] with the attached adapters of `set` on in the encoders (an
    /// adapter that patches the vision tower changes the soft tokens).
    pub fn prepare_with(
        &self,
        prompt: &Prompt,
        media: &Media,
        set: crate::lora::AdapterSet,
    ) -> Result<PromptInput> {
        crate::lora::with_adapters(set, || self.prepare(prompt, media))
    }

    /// A prompt with its images, videos and audio, ready for the decoder: markers
    /// expanded, tokenized, soft tokens spliced in. The encoders run with the adapters of
    /// the calling scope on ([`crate::lora::with_adapters`]; none outside one).
    pub fn prepare(&self, prompt: &Prompt, media: &Media) -> Result<PromptInput> {
        let missing = |arg: &str, loaded: bool, present: bool, what: &str| {
            Error::invalid_argument(
                arg,
                match (present, loaded) {
                    (true, false) => format!("the {what} encoder was not loaded"),
                    _ => format!("this checkpoint has no {what} encoder"),
                },
            )
        };
        if (!media.images.is_empty() || !media.videos.is_empty()) && self.vision.is_none() {
            let arg = if media.images.is_empty() {
                "videos"
            } else {
                "images"
            };
            return Err(missing(arg, false, self.config.vision.is_some(), "vision"));
        }
        if !media.audio.is_empty() && self.audio.is_none() {
            return Err(missing(
                "audio",
                false,
                self.config.audio.is_some(),
                "audio",
            ));
        }
        let processed = self.process_media(media)?;
        let expand = |text: &str| self.expand_markers(text, &processed);
        let ids = match prompt {
            Prompt::Ids(_) => self.prompt_ids(prompt)?,
            Prompt::Text(text) => self.prompt_ids(&Prompt::Text(expand(text)?))?,
            Prompt::Chat(messages) => {
                let rendered = self.chat_template.render(messages, true)?;
                let ids = self.tokenizer()?.encode_raw(&expand(&rendered)?)?;
                self.prompt_ids(&Prompt::Ids(ids))?
            }
            Prompt::Rendered(text) => {
                let ids = self.tokenizer()?.encode_raw(&expand(text)?)?;
                self.prompt_ids(&Prompt::Ids(ids))?
            }
        };
        build_input(
            &self.text,
            self.vision.as_ref(),
            self.audio.as_ref(),
            &self.config.mm_tokens,
            ids,
            &processed,
        )
    }

    /// The soft tokens of expanded prompt `ids`'s processed media, encoded by this
    /// checkpoint's towers (`None` for a text-only prompt).
    pub fn encode_media(
        &self,
        ids: &[u32],
        media: &ProcessedMedia,
    ) -> Result<Option<crate::multimodal::SoftTokens>> {
        self.encode_media_as(ids, media, None)
    }

    /// [`Self::encode_media`], the vision tower's activations in `dt` when given (training
    /// computes in f32 whatever the weights' dtype).
    pub fn encode_media_as(
        &self,
        ids: &[u32],
        media: &ProcessedMedia,
        dt: Option<DType>,
    ) -> Result<Option<crate::multimodal::SoftTokens>> {
        crate::multimodal::encode_media_as(
            &self.text,
            self.vision.as_ref(),
            self.audio.as_ref(),
            &self.config.mm_tokens,
            ids,
            media,
            dt,
        )
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
            Prompt::Rendered(text) => self.tokenizer()?.encode_raw(text)?,
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

/// Image, video and audio processor settings: the checkpoint's `processor_config.json` (or
/// the older `preprocessor_config.json` / `video_preprocessor_config.json`) over the
/// reference's defaults. Images default to the torchvision processor's resize and
/// rescale, as transformers 5.23 picks its torchvision image processor whenever
/// torchvision is installed (the PIL one only without it; the 12B's image processor and
/// every video processor exist only with torchvision). `ImageProcessorConfig::set_backend`
/// (the CLI's `--resize pillow`) selects the PIL processor's.
fn processor_configs(
    dir: &Path,
    config: &ModelConfig,
) -> Result<(
    ImageProcessorConfig,
    VideoProcessorConfig,
    AudioFeatureExtractor,
)> {
    let layout = match config.vision {
        Some(crate::config::vision::VisionSpec::Unified(_)) => PatchLayout::Merged,
        _ => PatchLayout::Tower,
    };
    let mut image = ImageProcessorConfig::new(layout);
    image.set_backend(ResizeKernel::Torchvision);
    let mut video = VideoProcessorConfig::new(layout);
    if let Some(v) = &config.vision {
        for c in [&mut image, &mut video.frame] {
            c.patch_size = v.patch_size();
            c.pooling_kernel_size = v.pooling_kernel_size();
        }
    }
    let read = |name: &str| -> Result<Option<serde_json::Value>> {
        let p = dir.join(name);
        p.exists().then(|| crate::error::read_json(&p)).transpose()
    };
    let combined = read("processor_config.json")?;
    let image_section = match &combined {
        Some(c) if c.get("image_processor").is_some() => c.get("image_processor").cloned(),
        _ => read("preprocessor_config.json")?,
    };
    let video_section = match &combined {
        Some(c) if c.get("video_processor").is_some() => c.get("video_processor").cloned(),
        _ => read("video_preprocessor_config.json")?,
    };
    let section_error = |section: &'static str| {
        let path = dir.join("processor_config.json");
        move |m: String| Error::config(path, format!("{section}: {m}"))
    };
    let mut audio = match &config.audio {
        Some(AudioSpec::Unified(c)) => AudioFeatureExtractor::Frames {
            sampling_rate: 16_000,
            samples_per_token: c.audio_embed_dim,
        },
        _ => AudioFeatureExtractor::mel(),
    };
    let audio_section = match &combined {
        Some(c) if c.get("feature_extractor").is_some() => c.get("feature_extractor").cloned(),
        _ => {
            read("preprocessor_config.json")?.filter(|v| v.get("feature_extractor_type").is_some())
        }
    };
    if let Some(s) = audio_section {
        audio
            .update_from(&s)
            .map_err(section_error("feature_extractor"))?;
    }
    if let Some(s) = image_section {
        image
            .update_from(&s)
            .map_err(section_error("image_processor"))?;
    }
    if let Some(s) = video_section {
        video
            .update_from(&s)
            .map_err(section_error("video_processor"))?;
    }
    Ok((image, video, audio))
}

/// Parameters stored per tower, counted from the checkpoint's tensor shapes (nothing loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParameterCounts {
    pub text: u64,
    /// Of `text`: the per-layer-embedding table, of which decoding reads one row per token.
    pub per_layer_table: u64,
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
            if name.starts_with(text) && name.ends_with("embed_tokens_per_layer.weight") {
                c.per_layer_table += n;
            }
        }
        c
    }

    pub fn total(&self) -> u64 {
        self.text + self.vision + self.audio + self.other
    }
}
