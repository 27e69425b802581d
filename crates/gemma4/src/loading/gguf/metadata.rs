//! The Hugging Face `config.json` and `tokenizer.json` of a llama.cpp Gemma 4 GGUF file,
//! rebuilt from its `gemma4.*` and `tokenizer.ggml.*` metadata, so that a GGUF file alone
//! is a checkpoint. Both are built as the JSON the Hugging Face files would hold and then
//! go through the same parsers ([`crate::config::ModelConfig::from_value`],
//! [`crate::prompt::tokenizer::Tokenizer`]) as a safetensors checkpoint's files, with the same
//! checks.
//!
//! The inverse of what llama.cpp's `convert_hf_to_gguf.py` (`Gemma4Model`) writes:
//! - per-layer lists (`feed_forward_length`, `attention.head_count_kv`) become
//!   `per_layer_config` entries (KV-shared layers twice as wide: `use_double_wide_mlp`), the sliding pattern becomes `layer_types`, and the two
//!   head sizes (`key_length` for full attention, `key_length_swa` for sliding) become
//!   `global_head_dim` / `head_dim`;
//! - the full-attention layers' proportional RoPE fraction is read back from `rope_freqs`
//!   (1.0 for rotated frequency pairs, 1e30 for the rest);
//! - `attention_k_eq_v` is inferred from full-attention layers that own a cache but have
//!   no `attn_v` tensor (the converter writes only what the checkpoint has);
//! - `layer_norm_rms_epsilon` is stored as f32; it is read back as the shortest decimal
//!   that rounds to that f32 (1e-6, not 9.99999997e-7), the value the checkpoint had.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as G;
use serde_json::{json, Map, Value};

/// Metadata of one GGUF file.
pub type Metadata = HashMap<String, G>;

fn int(v: &G) -> Option<u64> {
    Some(match v {
        G::U8(x) => *x as u64,
        G::I8(x) => u64::try_from(*x).ok()?,
        G::U16(x) => *x as u64,
        G::I16(x) => u64::try_from(*x).ok()?,
        G::U32(x) => *x as u64,
        G::I32(x) => u64::try_from(*x).ok()?,
        G::U64(x) => *x,
        G::I64(x) => u64::try_from(*x).ok()?,
        _ => return None,
    })
}

fn float(v: &G) -> Option<f64> {
    match v {
        // The shortest decimal that rounds to this f32: what was written before narrowing.
        G::F32(x) => x.to_string().parse().ok(),
        G::F64(x) => Some(*x),
        other => int(other).map(|i| i as f64),
    }
}

struct Meta<'a> {
    m: &'a Metadata,
    arch: &'a str,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&G> {
        self.m.get(&format!("{}.{key}", self.arch))
    }

    fn int(&self, key: &str) -> Result<u64, String> {
        let v = self
            .get(key)
            .ok_or_else(|| format!("metadata `{}.{key}` is missing", self.arch))?;
        int(v).ok_or_else(|| format!("metadata `{}.{key}` is not an integer", self.arch))
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key)
            .map(|v| {
                float(v).ok_or_else(|| format!("metadata `{}.{key}` is not a number", self.arch))
            })
            .transpose()
    }

    /// A per-layer value: either one scalar for every layer or a list of `n`.
    fn per_layer(&self, key: &str, n: usize) -> Result<Vec<u64>, String> {
        let v = self
            .get(key)
            .ok_or_else(|| format!("metadata `{}.{key}` is missing", self.arch))?;
        let bad = || {
            format!(
                "metadata `{}.{key}` must be an integer or {n} integers",
                self.arch
            )
        };
        match v {
            G::Array(a) if a.len() == n => a.iter().map(|x| int(x).ok_or_else(bad)).collect(),
            G::Array(_) => Err(bad()),
            other => Ok(vec![int(other).ok_or_else(bad)?; n]),
        }
    }
}

/// What the config needs to know about the file's tensors.
pub struct TensorFacts {
    /// Rows of `token_embd.weight` (the vocabulary the model scores).
    pub vocab_rows: usize,
    /// Rows of `per_layer_token_embd.weight`, when present.
    pub per_layer_vocab_rows: Option<usize>,
    /// Layers that have an `attn_v` tensor.
    pub layers_with_v: Vec<usize>,
    /// The `rope_freqs` factors, when present.
    pub rope_freqs: Option<Vec<f32>>,
}

/// The `config.json` of a llama.cpp Gemma 4 file: a text model (`model_type: gemma4`,
/// text only) for `general.architecture = "gemma4"`, an assistant drafter
/// (`model_type: gemma4_assistant`, dense head) for `"gemma4-assistant"`.
pub fn config_json(m: &Metadata, t: &TensorFacts) -> Result<Value, String> {
    let arch = match m.get("general.architecture") {
        Some(G::String(a)) => a.as_str(),
        _ => "gemma4",
    };
    let (text, eos) = text_config_json(&Meta { m, arch }, t)?;
    if arch == super::names::ASSISTANT_ARCHITECTURE {
        let meta = Meta { m, arch };
        return Ok(json!({
            "model_type": "gemma4_assistant",
            "text_config": text,
            "backbone_hidden_size": meta.int("embedding_length_out")?,
            "use_ordered_embeddings": false,
            "tie_word_embeddings": true,
        }));
    }
    Ok(json!({"model_type": "gemma4", "text_config": text, "eos_token_id": eos}))
}

/// The text decoder's config under the file's architecture key prefix, and its end ids.
fn text_config_json(m: &Meta<'_>, t: &TensorFacts) -> Result<(Value, Vec<u64>), String> {
    let n = m.int("block_count")? as usize;
    let swa: Vec<bool> = match m.get("attention.sliding_window_pattern") {
        Some(G::Array(a)) if a.len() == n => a
            .iter()
            .map(|v| match v {
                G::Bool(b) => Ok(*b),
                _ => Err("`attention.sliding_window_pattern` must hold booleans".to_string()),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(format!(
                "metadata `{}.attention.sliding_window_pattern` must list {n} layers",
                m.arch
            ))
        }
    };
    let layer_types: Vec<&str> = swa
        .iter()
        .map(|&s| {
            if s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    let head_full = m.int("attention.key_length")? as usize;
    let head_swa = m.int("attention.key_length_swa")? as usize;
    let ff = m.per_layer("feed_forward_length", n)?;
    let kv = m.per_layer("attention.head_count_kv", n)?;
    let shared = m.int("attention.shared_kv_layers").unwrap_or(0) as usize;
    let first_shared = n.saturating_sub(shared);
    // k_eq_v: a full-attention layer computing its own cache without a V projection.
    let k_eq_v = (0..first_shared)
        .find(|&i| !swa[i])
        .is_some_and(|i| !t.layers_with_v.contains(&i));

    // The double-wide MLP of E2B/E4B: KV-shared layers twice as wide as the others (the
    // converter writes the doubled widths; the config states the flag and the base width).
    let double_wide =
        shared > 0 && (0..n).all(|i| ff[i] == if i >= first_shared { 2 * ff[0] } else { ff[0] });
    let mut per_layer = Map::new();
    for i in 0..n {
        let head_dim = if swa[i] { head_swa } else { head_full };
        let width = if double_wide && i >= first_shared {
            ff[i] / 2
        } else {
            ff[i]
        };
        per_layer.insert(
            i.to_string(),
            json!({"head_dim": head_dim, "num_key_value_heads": kv[i], "intermediate_size": width}),
        );
    }

    let theta_full = m.opt_float("rope.freq_base")?.unwrap_or(1e6);
    let full_rope = match &t.rope_freqs {
        Some(f) if !f.is_empty() => {
            let rotated = f.iter().filter(|&&x| x == 1.0).count();
            json!({"rope_type": "proportional", "rope_theta": theta_full,
                   "partial_rotary_factor": rotated as f64 / f.len() as f64})
        }
        _ => json!({"rope_type": "default", "rope_theta": theta_full}),
    };
    let mut text = json!({
        "model_type": "gemma4_text",
        "num_hidden_layers": n,
        "hidden_size": m.int("embedding_length")?,
        "intermediate_size": ff[0],
        "num_attention_heads": m.int("attention.head_count")?,
        "num_key_value_heads": kv[0],
        "head_dim": head_swa,
        "global_head_dim": head_full,
        "layer_types": layer_types,
        "per_layer_config": per_layer,
        "sliding_window": m.int("attention.sliding_window")?,
        "max_position_embeddings": m.int("context_length")?,
        "rms_norm_eps": m.opt_float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": double_wide,
        "attention_k_eq_v": k_eq_v,
        "vocab_size": t.vocab_rows,
        "tie_word_embeddings": true,
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": m.opt_float("rope.freq_base_swa")?.unwrap_or(1e4)},
        },
    });
    let o = text.as_object_mut().expect("object");
    if let Some(c) = m.opt_float("final_logit_softcapping")? {
        o.insert("final_logit_softcapping".into(), c.into());
    }
    let ple = m.int("embedding_length_per_layer_input").unwrap_or(0);
    o.insert(
        "hidden_size_per_layer_input".into(),
        if ple == 0 { Value::Null } else { ple.into() },
    );
    o.insert(
        "vocab_size_per_layer_input".into(),
        t.per_layer_vocab_rows.unwrap_or(t.vocab_rows).into(),
    );
    if let Ok(experts) = m.int("expert_count") {
        if experts > 0 {
            o.insert("enable_moe_block".into(), true.into());
            o.insert("num_experts".into(), experts.into());
            o.insert("top_k_experts".into(), m.int("expert_used_count")?.into());
            o.insert(
                "moe_intermediate_size".into(),
                m.int("expert_feed_forward_length")?.into(),
            );
        }
    }
    let tok = |k: &str| m.m.get(&format!("tokenizer.ggml.{k}")).and_then(int);
    if let Some(id) = tok("bos_token_id") {
        o.insert("bos_token_id".into(), id.into());
    }
    if let Some(id) = tok("padding_token_id") {
        o.insert("pad_token_id".into(), id.into());
    }
    // Gemma 4's end of turn, `<turn|>`, ends generation as the released checkpoints'
    // `eos_token_id: [1, 106]` says; the converter records only `<eos>`.
    let end_of_turn = match m.m.get("tokenizer.ggml.tokens") {
        Some(G::Array(a)) => a
            .iter()
            .position(|v| matches!(v, G::String(s) if s == "<turn|>"))
            .map(|i| i as u64),
        _ => None,
    };
    let mut eos: Vec<u64> = Vec::new();
    for id in [tok("eos_token_id"), tok("eot_token_id"), end_of_turn]
        .into_iter()
        .flatten()
    {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    if !eos.is_empty() {
        o.insert("eos_token_id".into(), json!(eos));
    }
    Ok((text, eos))
}

/// Gemma 4's control markup (`<|turn>`, `<turn|>`, `<|image|>`, `<|tool_call>`, `<|"|>`,
/// ...): added tokens in the reference tokenizer, matched whole before BPE, but written
/// by llama.cpp's converter as normal tokens (type 1), so recognised by their shape.
fn is_markup(t: &str) -> bool {
    t.len() >= 3
        && t.starts_with('<')
        && t.ends_with('>')
        && (t.starts_with("<|") || t.ends_with("|>"))
        && !t.chars().any(char::is_whitespace)
}

/// The `tokenizer.json` of a file with `tokenizer.ggml.model = "gemma4"`: the BPE
/// vocabulary and merges with byte fallback, and the added tokens (llama.cpp's token
/// types: 3 control = special, 4 user-defined = added, not special; 2 unknown = special;
/// plus Gemma 4's control markup, see `is_markup`, as special).
/// The normalizer, pre-tokenizer and decoder are Gemma's, set by [`crate::prompt::tokenizer`].
pub fn tokenizer_json(m: &Metadata) -> Result<Value, String> {
    let get = |k: &str| m.get(&format!("tokenizer.ggml.{k}"));
    match get("model") {
        Some(G::String(s)) if s == "gemma4" => {}
        Some(G::String(s)) => {
            return Err(format!(
                "metadata `tokenizer.ggml.model` is `{s}`, not Gemma 4's `gemma4`"
            ))
        }
        _ => return Err("metadata `tokenizer.ggml.model` is missing".into()),
    }
    let strings = |k: &str| -> Result<Vec<String>, String> {
        match get(k) {
            Some(G::Array(a)) => a
                .iter()
                .map(|v| match v {
                    G::String(s) => Ok(s.clone()),
                    _ => Err(format!("metadata `tokenizer.ggml.{k}` must hold strings")),
                })
                .collect(),
            _ => Err(format!("metadata `tokenizer.ggml.{k}` is missing")),
        }
    };
    let tokens = strings("tokens")?;
    let merges = strings("merges")?;
    let types: Vec<u64> = match get("token_type") {
        Some(G::Array(a)) if a.len() == tokens.len() => {
            a.iter().map(|v| int(v).unwrap_or(1)).collect()
        }
        _ => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert(t.clone(), id.into());
        if matches!(ty, 2..=4) || is_markup(t) {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": ty != 4}),
            );
        }
    }
    let id_of = |k: &str| get(k).and_then(int).and_then(|i| tokens.get(i as usize));
    let unk = id_of("unknown_token_id").cloned();
    let add_bos = matches!(get("add_bos_token"), Some(G::Bool(true)));
    let post = match (add_bos, id_of("bos_token_id")) {
        (true, Some(bos)) => {
            let bos_id = vocab[bos.as_str()].clone();
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bos.as_str(): {"id": bos, "ids": [bos_id], "tokens": [bos]}}})
        }
        _ => Value::Null,
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": post, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}
