//! `gemma4 parse-output`: the message the server would return for a completion, as JSON,
//! for debugging templates and the output parser.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use gemma4::prompt::output_parser::{parse_output, Markers};

#[derive(Args)]
pub(crate) struct ParseOutputArgs {
    /// Checkpoint directory or hub id (only its tokenizer is read).
    #[arg(long, value_parser = crate::args::model_dir)]
    pub(crate) model: PathBuf,
    /// The completion as comma-separated token ids.
    #[arg(
        long,
        value_name = "IDS",
        required_unless_present = "text",
        conflicts_with = "text"
    )]
    pub(crate) ids: Option<String>,
    /// The completion as text; marker tokens written out (`<|tool_call>`, ...) are read as
    /// the marker ids.
    #[arg(long)]
    pub(crate) text: Option<String>,
    /// The completion continues a prompt that opened the thought channel (ending in
    /// `<|channel>thought\n`, as a template that forces thinking writes it): it is read
    /// as a thought until `<channel|>`.
    #[arg(long)]
    pub(crate) thinking: bool,
}

pub(crate) fn cmd_parse_output(a: ParseOutputArgs) -> Result<()> {
    let tok = gemma4::model::load_tokenizer(&a.model)?;
    let ids = match (&a.ids, &a.text) {
        (Some(ids), _) => crate::args::parse_ids(ids)?,
        (_, Some(text)) => tok.encode_raw(text)?,
        _ => anyhow::bail!("one of --ids or --text is required"),
    };
    let markers = Markers::from_tokenizer(&tok)?;
    let ids = if a.thinking {
        let mut opened = vec![markers.channel_open];
        opened.extend(tok.encode_raw("thought\n")?);
        opened.extend(ids);
        opened
    } else {
        ids
    };
    let message = parse_output(&tok, markers, &ids)?;
    let json = crate::openai::message_json(&message, |i| format!("call_{i}"));
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
