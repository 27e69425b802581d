//! `gemma4`: run Gemma 4 checkpoints from the command line.
//!
//! - `gemma4 generate --model DIR --prompt TEXT` (or `--prompt-ids`, `--chat`): streams text;
//!   `--image PATH` / `--video PATH` / `--audio PATH` go with `<|image|>` / `<|video|>` /
//!   `<|audio|>` markers in the prompt
//! - `gemma4 logits --model DIR --prompt-ids 2,.. --out FILE.npy`: f32 logits `[seq, vocab]`
//! - `gemma4 embed-image --model DIR --image PATH --out FILE.npy`: an image's soft tokens
//! - `gemma4 embed-audio --model DIR --audio PATH --out FILE.npy`: a clip's soft tokens
//! - `gemma4 info --model DIR`: sizes, layer plan and parameter counts
//!
//! The library does the work; this file only parses arguments and prints.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gemma4::audio::decode::load_audio;
use gemma4::prompt::chat::Message;
use gemma4::config::{KvSource, ModelConfig};
use gemma4::generate::{generate_from, GenerateOptions};
use gemma4::vision::image_processor::load_image;
use gemma4::model::{Media, ParameterCounts};
use gemma4::quant::QuantType;
use gemma4::vision::resize::ResizeKernel;
use gemma4::generate::sampling::SamplingParams;
use gemma4::text::model::LogitsFor;
use gemma4::prompt::tokenizer::StreamDecoder;
use gemma4::loading::weights::Checkpoint;
use gemma4::{Gemma4, LoadOptions, Prompt};
use serde_json::json;

mod bench;
mod embed;

#[derive(Parser)]
#[command(
    name = "gemma4",
    version,
    about = "Run Google's Gemma 4 models, exact to the Hugging Face reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for the matrix kernels (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Write the f32 logits of every prompt position to a .npy file ([seq, vocab]).
    Logits(LogitsArgs),
    /// Run images through the vision encoder and projector; write their soft tokens.
    EmbedImage(EmbedImageArgs),
    /// Run audio clips through the audio encoder and projector; write their soft tokens.
    EmbedAudio(EmbedAudioArgs),
    /// Show a checkpoint's sizes, layer plan and parameter counts.
    Info(InfoArgs),
    /// Write a checkpoint with the text decoder block-quantized (model.gguf plus the
    /// source's config and tokenizer files), which loads without re-quantizing.
    Quantize(QuantizeArgs),
    /// Measure load time, prefill and decode tokens/s (median of several runs) and peak RSS.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Compute dtype (default: the checkpoint's own, as `from_pretrained` loads it: bf16
    /// for the released checkpoints). f32 matches the reference run in f32 to 1e-4.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Quantize the text decoder at load time: q8_0, q4_k, q6_k, q4_0 or q5_0 (projections in
    /// that format, the tied embedding in q8_0/q6_k; norms and the image/audio towers
    /// keep --dtype).
    #[arg(long, value_name = "FORMAT")]
    quant: Option<QuantType>,
}

impl ModelArgs {
    /// `--dtype`, or the checkpoint's own ([`gemma4::default_dtype`]); f32 for a
    /// directory that does not exist, which loading then reports.
    fn dtype(&self) -> Result<DType> {
        Ok(match self.dtype {
            Some(d) => d.dtype(),
            None if self.model.is_dir() => gemma4::default_dtype(&self.model)?,
            None => DType::F32,
        })
    }
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct PromptArgs {
    /// Raw text prompt (a BOS token is put in front if the tokenizer adds none).
    #[arg(long)]
    prompt: Option<String>,
    /// Comma-separated token ids, used as they are.
    #[arg(long, value_name = "IDS")]
    prompt_ids: Option<String>,
    /// A user message, rendered with the checkpoint's chat template.
    #[arg(long)]
    chat: Option<String>,
}

#[derive(Args)]
struct MediaArgs {
    /// An image for the next `<|image|>` marker of the prompt (repeatable; `-` reads
    /// standard input). PNG, JPEG, GIF, WebP or BMP.
    #[arg(long, value_name = "PATH")]
    image: Vec<PathBuf>,
    /// A video for the next `<|video|>` marker (repeatable): an animated GIF or a directory
    /// of frames.
    #[arg(long, value_name = "PATH")]
    video: Vec<PathBuf>,
    /// Soft-token budget per image: 70, 140, 280, 560 or 1120 (default: the checkpoint's
    /// processor config, 280 for released checkpoints).
    #[arg(long, value_name = "N")]
    image_tokens: Option<usize>,
    /// Image processor to match: torchvision (the default, as transformers picks when
    /// torchvision is installed) or pillow (the reference's PIL processor).
    #[arg(long, value_name = "KERNEL")]
    resize: Option<ResizeKernel>,
    /// An audio clip for the next `<|audio|>` marker (repeatable; `-` reads standard
    /// input). WAV, FLAC, MP3 or Ogg Vorbis, any rate and channel count.
    #[arg(long, value_name = "PATH")]
    audio: Vec<PathBuf>,
    /// Resampling of clips not at 16 kHz: torchaudio (exact to the reference's
    /// torchaudio backend) or soxr (its soundfile backend; needs the `soxr` build feature).
    #[arg(long, value_name = "KIND")]
    resample: Option<gemma4::audio::resample::Resampler>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    media: MediaArgs,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Always pick the most likely token (overrides the checkpoint's sampling defaults).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (0 = greedy). Unset sampling flags take the checkpoint's
    /// generation_config.json values.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    min_p: Option<f64>,
    #[arg(long)]
    repetition_penalty: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    media: MediaArgs,
    /// Output .npy file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct EmbedImageArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    media: MediaArgs,
    /// Output .npy file: the soft tokens of all images, concatenated ([tokens, hidden]).
    #[arg(long)]
    out: PathBuf,
    /// Print a JSON summary (tokens per image, shape) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EmbedAudioArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    media: MediaArgs,
    /// Output .npy file: the soft tokens of all clips, concatenated ([tokens, width]).
    #[arg(long)]
    out: PathBuf,
    /// Write the encoder's output before `embed_audio` (the tower's soft tokens, or the
    /// 12B's raw frames) instead of the text-width soft tokens.
    #[arg(long)]
    before_projection: bool,
    /// Print a JSON summary (tokens per clip, shape) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens (a fixed pseudo-random prompt).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per run (greedy, no stop).
    #[arg(long, default_value_t = 32)]
    gen: usize,
    /// Measured runs; the medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Unmeasured runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Sequences decoded together, each with its own prompt and cache: every step is
    /// one forward pass over all of them. Reports aggregate and per-sequence tok/s.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QuantizeArgs {
    /// Source checkpoint directory (safetensors).
    #[arg(long)]
    model: PathBuf,
    /// q8_0, q4_k, q6_k, q4_0 or q5_0.
    #[arg(long, value_name = "FORMAT")]
    quant: QuantType,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            std::process::exit(1);
        }
        // Read by candle's kernels and rayon's pool when they first start; nothing has run
        // yet, and this is the only thread.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // The command runs on a worker of the rayon pool, not beside it: a parallel kernel
    // called from outside the pool is injected into it and the caller sleeps until the
    // workers finish, two thread wake-ups per projection (~280 per E2B decode step).
    // From inside, the calling thread takes its share at once and only the other
    // workers are signalled.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .stack_size(16 << 20)
        .build();
    let result = match pool {
        Ok(pool) => pool.install(|| run(cli)),
        Err(e) => Err(anyhow::anyhow!("cannot start the thread pool: {e}")),
    };
    if let Err(e) = result {
        eprintln!("error: {:#}", with_flag_names(e));
        std::process::exit(1);
    }
}

/// The library names a wrong media argument by its field of `Media` (`images`, `videos`,
/// `audio`); on the command line that is the flag that gives it.
fn with_flag_names(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<gemma4::Error>() {
        Ok(gemma4::Error::InvalidArgument { arg, message }) => {
            let arg = match arg.as_str() {
                "images" => "--image".to_string(),
                "videos" => "--video".to_string(),
                "audio" => "--audio".to_string(),
                _ => arg,
            };
            gemma4::Error::InvalidArgument { arg, message }.into()
        }
        Ok(other) => other.into(),
        Err(e) => e,
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Logits(a) => cmd_logits(a),
        Command::EmbedImage(a) => embed::cmd_embed_image(a),
        Command::EmbedAudio(a) => embed::cmd_embed_audio(a),
        Command::Info(a) => cmd_info(a),
        Command::Quantize(a) => cmd_quantize(a),
        Command::Bench(a) => bench::cmd_bench(a),
    }
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let report = gemma4::quant::checkpoint::quantize_checkpoint(
        &a.model,
        &a.out,
        a.quant,
        load_progress("quantizing"),
    )?;
    let size = |b: u64| match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    };
    if a.json {
        let quantized: serde_json::Map<String, serde_json::Value> = report
            .quantized
            .iter()
            .map(|(q, n)| (q.to_string(), json!(n)))
            .collect();
        println!(
            "{}",
            json!({
                "out": a.out.join("model.gguf").display().to_string(),
                "quant": a.quant.to_string(),
                "tensors": report.tensors,
                "quantized": quantized,
                "bytes_in": report.bytes_in,
                "bytes_out": report.bytes_out,
            })
        );
    } else {
        let q: Vec<String> = report
            .quantized
            .iter()
            .map(|(q, n)| format!("{n} in {q}"))
            .collect();
        println!(
            "wrote {}: {} tensors ({}; the rest as stored), {} -> {}",
            a.out.join("model.gguf").display(),
            report.tensors,
            q.join(", "),
            size(report.bytes_in),
            size(report.bytes_out)
        );
    }
    Ok(())
}

/// A byte progress bar on a TTY, nothing when stderr is piped.
fn load_progress(what: &'static str) -> Option<gemma4::loading::weights::ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{bytes}}/{{total_bytes}} {{msg}}"
        ))
        .expect("static template"),
    );
    Some(Box::new(move |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        if done >= total {
            bar.finish_and_clear();
        }
    }))
}

/// Loads the checkpoint; the image and audio encoders only when the command has images,
/// videos or clips, so text prompts never read their weights.
fn load(args: &ModelArgs, media: &MediaArgs) -> Result<Gemma4> {
    let progress = load_progress("loading");
    let opts = LoadOptions {
        dtype: args.dtype()?,
        device: Device::Cpu,
        progress,
        vision: !media.image.is_empty() || !media.video.is_empty(),
        audio: !media.audio.is_empty(),
        quant: args.quant,
    };
    Ok(Gemma4::load(&args.model, opts)?)
}

/// Applies the media flags to the model's processors and loads the files.
fn media_of(a: &MediaArgs, model: &mut Gemma4) -> Result<Media> {
    let stdin_uses = a
        .image
        .iter()
        .chain(&a.video)
        .chain(&a.audio)
        .filter(|p| p.as_os_str() == "-")
        .count();
    if stdin_uses > 1 {
        bail!("standard input (`-`) can be given for only one --image, --video or --audio");
    }
    if let Some(n) = a.image_tokens {
        model.image_processor.max_soft_tokens = n;
        model
            .image_processor
            .validate()
            .map_err(|m| anyhow::anyhow!("--image-tokens: {m}"))?;
    }
    if let Some(k) = a.resize {
        model.image_processor.set_backend(k);
    }
    if let Some(r) = a.resample {
        model.resampler = r;
    }
    let images = a
        .image
        .iter()
        .map(|p| load_image(p))
        .collect::<gemma4::Result<Vec<_>>>()?;
    let videos = a
        .video
        .iter()
        .map(|p| gemma4::vision::video::load_video(p))
        .collect::<gemma4::Result<Vec<_>>>()?;
    let audio = a
        .audio
        .iter()
        .map(|p| load_audio(p))
        .collect::<gemma4::Result<Vec<_>>>()?;
    for (clip, path) in audio.iter().zip(&a.audio) {
        if let Some((kept, total)) = model.audio_truncation(clip) {
            eprintln!(
                "warning: {}: {total:.1} s long; the model reads its first {kept:.0} s (the reference's limit)",
                path.display()
            );
        }
    }
    Ok(Media {
        images,
        videos,
        audio,
    })
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--prompt-ids: `{t}` is not a token id"))
        })
        .collect()
}

fn prompt_of(p: &PromptArgs, system: Option<&str>) -> Result<Prompt> {
    Ok(match (&p.prompt, &p.prompt_ids, &p.chat) {
        (Some(t), _, _) => Prompt::Text(t.clone()),
        (_, Some(ids), _) => Prompt::Ids(parse_ids(ids)?),
        (_, _, Some(msg)) => {
            let mut m = Vec::new();
            if let Some(s) = system {
                m.push(Message::new("system", s));
            }
            m.push(Message::new("user", msg));
            Prompt::Chat(m)
        }
        _ => bail!("one of --prompt, --prompt-ids or --chat is required"),
    })
}

fn sampling_of(a: &GenerateArgs, model: &Gemma4) -> SamplingParams {
    let g = &model.generation_config;
    let any_flag =
        a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some() || a.min_p.is_some();
    if a.greedy || (!any_flag && !g.do_sample) {
        return SamplingParams {
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
            ..Default::default()
        };
    }
    SamplingParams {
        temperature: a.temperature.or(g.temperature).or(Some(1.0)),
        top_k: a.top_k.or(g.top_k),
        top_p: a.top_p.or(g.top_p),
        min_p: a.min_p.or(g.min_p),
        repetition_penalty: a.repetition_penalty.or(g.repetition_penalty),
        seed: a.seed,
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let mut model = load(&a.model, &a.media)?;
    let prompt = prompt_of(&a.prompt, a.system.as_deref())?;
    let media = media_of(&a.media, &mut model)?;
    let input = model.prepare(&prompt, &media)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: sampling_of(&a, &model),
        stop_ids: model.stop_ids(),
    };
    let tok = model.tokenizer.as_ref();
    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout();
    let out = generate_from(&model.text, &input, &opts, |id| {
        if a.json {
            return Ok(());
        }
        match tok {
            Some(t) => {
                if let Some(piece) = stream.push(t, id)? {
                    print!("{piece}");
                }
            }
            None => print!("{id} "),
        }
        let _ = stdout.flush();
        Ok(())
    })?;
    let text = match tok {
        Some(t) => Some(t.decode(&out.generated_ids, true)?),
        None => None,
    };
    if a.json {
        let obj = json!({
            "prompt_ids": out.prompt_ids,
            "generated_ids": out.generated_ids,
            "text": text,
            "stop_reason": out.stop_reason.as_str(),
            "prefill_tok_s": out.prefill_tok_s(),
            "decode_tok_s": out.decode_tok_s(),
            "prefill_secs": out.prefill_secs,
            "decode_secs": out.decode_secs,
        });
        println!("{obj}");
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated, stop: {}; prefill {:.1} tok/s, decode {:.1} tok/s]",
            out.prompt_ids.len(),
            out.generated_ids.len(),
            out.stop_reason.as_str(),
            out.prefill_tok_s(),
            out.decode_tok_s()
        );
    }
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let mut model = load(&a.model, &a.media)?;
    let media = media_of(&a.media, &mut model)?;
    let input = model.prepare(&prompt_of(&a.prompt, None)?, &media)?;
    let logits = model
        .text
        .forward_input(&input, &mut model.text.new_cache(), LogitsFor::All)?;
    let (s, v) = logits.dims2()?;
    let data: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    gemma4::loading::npy::write_f32(&a.out, &[s, v], &data)?;
    eprintln!("wrote {} ([{s}, {v}] f32)", a.out.display());
    Ok(())
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let cfg = ModelConfig::from_file(&a.model.join("config.json"))?;
    let ckpt = Checkpoint::open(&a.model)?;
    let counts = ParameterCounts::of(&ckpt, cfg.architecture);
    let t = &cfg.text;
    let layers: Vec<_> = t
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "layer": i,
                "type": l.layer_type.as_str(),
                "head_dim": l.head_dim,
                "kv_heads": l.num_kv_heads,
                "mlp_width": l.intermediate_size,
                "k_eq_v": l.k_eq_v,
                "kv_from": match l.kv_source { KvSource::Own => json!(i), KvSource::Shared { producer } => json!(producer) },
            })
        })
        .collect();
    let info = json!({
        "model": a.model.display().to_string(),
        "architecture": format!("{:?}", cfg.architecture),
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "sliding_window": t.sliding_window,
        "max_position_embeddings": t.max_position_embeddings,
        "final_logit_softcapping": t.final_logit_softcapping,
        "per_layer_embedding_width": t.hidden_size_per_layer_input,
        "num_kv_shared_layers": t.num_kv_shared_layers,
        "moe": t.moe.as_ref().map(|m| json!({"experts": m.num_experts, "top_k": m.top_k, "width": m.intermediate_size})),
        "has_vision": cfg.vision.is_some(),
        "has_audio": cfg.audio.is_some(),
        "audio": audio_summary(&cfg).map(|(kind, detail)| json!({"encoder": kind, "detail": detail})),
        "parameters": {"text": counts.text, "vision": counts.vision, "audio": counts.audio, "other": counts.other, "total": counts.total()},
        "layers": layers,
    });
    if a.json {
        println!("{info}");
        return Ok(());
    }
    print_info(&a.model, &cfg, &counts);
    Ok(())
}

/// (kind, one-line description) of the checkpoint's audio encoder.
fn audio_summary(cfg: &ModelConfig) -> Option<(&'static str, String)> {
    use gemma4::config::audio::AudioSpec;
    Some(match cfg.audio.as_ref()? {
        AudioSpec::Tower(a) => (
            "conformer",
            format!(
                "{} layers, width {}, {} heads, chunks of {} frames with {} left / {} right context, output {}",
                a.num_hidden_layers,
                a.hidden_size,
                a.num_attention_heads,
                a.attention_chunk_size,
                a.attention_context_left,
                a.attention_context_right,
                a.output_proj_dims
            ),
        ),
        AudioSpec::Unified(a) => (
            "frames",
            format!("raw frames of {} samples, no tower", a.audio_embed_dim),
        ),
    })
}

fn print_info(dir: &Path, cfg: &ModelConfig, c: &ParameterCounts) {
    let t = &cfg.text;
    println!("{}: {:?}", dir.display(), cfg.architecture);
    println!(
        "  hidden {}  layers {}  heads {}  vocab {}  window {}  context {}",
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.vocab_size,
        t.sliding_window,
        t.max_position_embeddings
    );
    if t.hidden_size_per_layer_input > 0 {
        println!(
            "  per-layer embeddings: {} per layer",
            t.hidden_size_per_layer_input
        );
    }
    if let Some(m) = &t.moe {
        println!(
            "  MoE: {} experts, top-{}, width {}",
            m.num_experts, m.top_k, m.intermediate_size
        );
    }
    if let Some((kind, detail)) = audio_summary(cfg) {
        println!("  audio ({kind}): {detail}");
    }
    println!(
        "  parameters: text {}  vision {}  audio {}  other {}  total {}",
        c.text,
        c.vision,
        c.audio,
        c.other,
        c.total()
    );
    println!("  layer  type     head_dim  kv_heads  mlp     kv");
    for (i, l) in t.layers.iter().enumerate() {
        let kv = match l.kv_source {
            KvSource::Own if l.k_eq_v => "own (k=v)".to_string(),
            KvSource::Own => "own".to_string(),
            KvSource::Shared { producer } => format!("from {producer}"),
        };
        let ty = if l.layer_type == gemma4::config::LayerType::Full {
            "full"
        } else {
            "sliding"
        };
        println!(
            "  {i:>5}  {ty:<8} {:>8}  {:>8}  {:<6}  {kv}",
            l.head_dim, l.num_kv_heads, l.intermediate_size
        );
    }
}
