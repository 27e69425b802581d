//! `gemma4`: run Gemma 4 checkpoints from the command line.
//!
//! - `gemma4 generate --model DIR --prompt TEXT` (or `--prompt-ids`, `--chat`): streams text;
//!   `--image PATH` / `--video PATH` / `--audio PATH` go with `<|image|>` / `<|video|>` /
//!   `<|audio|>` markers in the prompt
//! - `gemma4 logits --model DIR --prompt-ids 2,.. --out FILE.npy`: f32 logits `[seq, vocab]`
//! - `gemma4 embed-image --model DIR --image PATH --out FILE.npy`: an image's soft tokens
//! - `gemma4 embed-audio --model DIR --audio PATH --out FILE.npy`: a clip's soft tokens
//! - `gemma4 info --model DIR`: sizes, layer plan and parameter counts
//! - `gemma4 parse-output --model DIR --ids ...`: the message a completion reads as
//! - `gemma4 serve --model DIR`: an OpenAI-compatible server
//! - `gemma4 chat --model DIR`: an interactive chat in the terminal
//!
//! The library does the work; each command is a file of its own (`args.rs` holds what
//! they share) that parses its arguments and prints.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod args;
mod bench;
mod chat;
mod download;
mod embed;
mod finetune;
mod generate;
mod info;
mod logits;
mod loss_plot;
mod merge_lora;
mod openai;
mod parse_output;
mod quantize;
mod serve;
mod spec_bench;

use bench::BenchArgs;
use chat::ChatArgs;
use embed::{EmbedAudioArgs, EmbedImageArgs};
use finetune::FinetuneArgs;
use generate::GenerateArgs;
use info::InfoArgs;
use logits::LogitsArgs;
use merge_lora::MergeLoraArgs;
use parse_output::ParseOutputArgs;
use quantize::QuantizeArgs;
use serve::ServeArgs;

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
    /// Write a checkpoint with LoRA adapters (peft's format) merged into its weights;
    /// `quantize` then makes a GGUF of it.
    MergeLora(MergeLoraArgs),
    /// Fine-tune a LoRA adapter (peft's format) on JSONL data.
    Finetune(FinetuneArgs),
    /// Measure load time, prefill and decode tokens/s (median of several runs) and peak RSS.
    Bench(BenchArgs),
    /// Chat with the model in the terminal (multi-turn, streaming, /image and /audio).
    Chat(ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions,
    /// streaming, tool calls, images and audio), many requests at once.
    Serve(ServeArgs),
    /// Print, as JSON, the message (content, reasoning, tool calls) the server would return
    /// for a completion given as ids or text.
    ParseOutput(ParseOutputArgs),
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
    let result = match (pool, cli.command) {
        // The server's engine thread joins the pool itself; its async threads stay out.
        (Ok(pool), Command::Serve(a)) => serve::cmd_serve(a, std::sync::Arc::new(pool)),
        (Ok(pool), command) => pool.install(|| run(command)),
        (Err(e), _) => Err(anyhow::anyhow!("cannot start the thread pool: {e}")),
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
                "temperature" | "top_k" | "top_p" | "min_p" | "repetition_penalty" => {
                    format!("--{}", arg.replace('_', "-"))
                }
                _ => arg,
            };
            gemma4::Error::InvalidArgument { arg, message }.into()
        }
        Ok(other) => other.into(),
        Err(e) => e,
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Generate(a) => generate::cmd_generate(a),
        Command::Logits(a) => logits::cmd_logits(a),
        Command::EmbedImage(a) => embed::cmd_embed_image(a),
        Command::EmbedAudio(a) => embed::cmd_embed_audio(a),
        Command::Info(a) => info::cmd_info(a),
        Command::Quantize(a) => quantize::cmd_quantize(a),
        Command::MergeLora(a) => merge_lora::cmd_merge_lora(a),
        Command::Finetune(a) => finetune::cmd_finetune(a),
        Command::Bench(a) => bench::cmd_bench(a),
        Command::ParseOutput(a) => parse_output::cmd_parse_output(a),
        Command::Chat(a) => chat::cmd_chat(a),
        Command::Serve(a) => anyhow::bail!(
            "internal: `serve` runs outside the pool ({} requested)",
            a.host
        ),
    }
}
