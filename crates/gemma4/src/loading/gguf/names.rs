//! llama.cpp's names for Gemma 4's text tensors, as its `convert_hf_to_gguf.py` writes them
//! (`general.architecture = "gemma4"`), mapped back to the Hugging Face names the rest of
//! the engine loads by.
//!
//! The converter changes names only, not values, for Gemma 4: its norms are stored as the
//! checkpoint has them (Gemma 4's `norm_shift` is 0, unlike Gemma 3's `+1`), expert stacks
//! keep the `[experts, out, in]` layout, and GGUF's innermost-first dims read back as the
//! row-major shapes of the safetensors. What it adds: `rope_freqs` (its way of expressing
//! the proportional RoPE of full-attention layers, which the config already gives; ignored)
//! and `output.weight`, a copy of the tied embedding that llama-quantize may store in
//! another format (loaded as the LM head, `lm_head.weight` beside the text model's other
//! tensors). What it drops are tensors the reference never uses: the K/V projections of
//! KV-shared layers.

/// Where the text decoder's tensors live in a Hugging Face `Gemma4ForConditionalGeneration`
/// checkpoint.
const PREFIX: &str = "model.language_model.";

/// The value of `general.architecture` in llama.cpp's Gemma 4 files.
pub const ARCHITECTURE: &str = "gemma4";

/// The value of `general.architecture` in llama.cpp's files of Gemma 4's assistant
/// drafters (`Gemma4AssistantForCausalLM`).
pub const ASSISTANT_ARCHITECTURE: &str = "gemma4-assistant";

/// What to do with one tensor of a llama.cpp Gemma 4 file.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    /// Load it under this Hugging Face name.
    Hf(String),
    /// A tensor the converter adds that this engine does not need.
    Ignored,
}

/// The Hugging Face name of llama.cpp tensor `name`; `None` for a name this table does
/// not know (a newer converter, or a file that is not a Gemma 4 text model).
pub fn hf_name(name: &str) -> Option<Mapped> {
    let global = |s: &str| Some(Mapped::Hf(format!("{PREFIX}{s}")));
    match name {
        "token_embd.weight" => return global("embed_tokens.weight"),
        "per_layer_token_embd.weight" => return global("embed_tokens_per_layer.weight"),
        "per_layer_model_proj.weight" => return global("per_layer_model_projection.weight"),
        "per_layer_proj_norm.weight" => return global("per_layer_projection_norm.weight"),
        "output_norm.weight" => return global("norm.weight"),
        // The LM head: the tied embedding's values, but llama-quantize gives it its own
        // format (Q6_K in a Q4_K_M file whose embedding is Q4_K), so it is kept apart.
        "output.weight" => return global("lm_head.weight"),
        "rope_freqs.weight" => return Some(Mapped::Ignored),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match tensor {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "post_attention_norm.weight" => "post_attention_layernorm.weight",
        "ffn_norm.weight" => "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight" => "post_feedforward_layernorm.weight",
        "pre_ffw_norm_2.weight" => "pre_feedforward_layernorm_2.weight",
        "post_ffw_norm_1.weight" => "post_feedforward_layernorm_1.weight",
        "post_ffw_norm_2.weight" => "post_feedforward_layernorm_2.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "ffn_gate_inp.weight" => "router.proj.weight",
        "ffn_gate_inp.scale" => "router.scale",
        "ffn_down_exps.scale" => "router.per_expert_scale",
        "ffn_gate_up_exps.weight" => "experts.gate_up_proj",
        "ffn_down_exps.weight" => "experts.down_proj",
        "inp_gate.weight" => "per_layer_input_gate.weight",
        "proj.weight" => "per_layer_projection.weight",
        "post_norm.weight" => "post_per_layer_input_norm.weight",
        "layer_output_scale.weight" => "layer_scalar",
        _ => return None,
    };
    global(&format!("layers.{layer}.{hf}"))
}

/// The Hugging Face name of tensor `name` of a llama.cpp drafter file: the decoder's
/// names under `model.`, and the two projections the converter files under `nextn.`.
/// The converter drops the centroid head (`masked_embedding.*`), so such a file drafts
/// with the dense tied head, as llama.cpp does.
pub fn assistant_hf_name(name: &str) -> Option<Mapped> {
    match name {
        "nextn.pre_projection.weight" => return Some(Mapped::Hf("pre_projection.weight".into())),
        "nextn.post_projection.weight" => return Some(Mapped::Hf("post_projection.weight".into())),
        _ => {}
    }
    match hf_name(name)? {
        Mapped::Hf(hf) => Some(Mapped::Hf(format!(
            "model.{}",
            hf.strip_prefix(PREFIX).unwrap_or(&hf)
        ))),
        Mapped::Ignored => Some(Mapped::Ignored),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_layer_and_global_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight"),
            Some(Mapped::Hf(
                "model.language_model.layers.12.self_attn.q_proj.weight".into()
            ))
        );
        assert_eq!(
            hf_name("blk.0.ffn_down_exps.scale"),
            Some(Mapped::Hf(
                "model.language_model.layers.0.router.per_expert_scale".into()
            ))
        );
        assert_eq!(
            hf_name("token_embd.weight"),
            Some(Mapped::Hf(
                "model.language_model.embed_tokens.weight".into()
            ))
        );
        assert_eq!(hf_name("rope_freqs.weight"), Some(Mapped::Ignored));
        assert_eq!(
            hf_name("output.weight"),
            Some(Mapped::Hf("model.language_model.lm_head.weight".into()))
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.3.something_new.weight"), None);
        assert_eq!(hf_name("v.blk.0.attn_q.weight"), None);
    }

    #[test]
    fn maps_a_drafters_names() {
        let hf = |s: &str| Some(Mapped::Hf(s.into()));
        assert_eq!(
            assistant_hf_name("nextn.pre_projection.weight"),
            hf("pre_projection.weight")
        );
        assert_eq!(
            assistant_hf_name("blk.3.attn_q_norm.weight"),
            hf("model.layers.3.self_attn.q_norm.weight")
        );
        assert_eq!(
            assistant_hf_name("token_embd.weight"),
            hf("model.embed_tokens.weight")
        );
        assert_eq!(
            assistant_hf_name("rope_freqs.weight"),
            Some(Mapped::Ignored)
        );
        assert_eq!(assistant_hf_name("nextn.other.weight"), None);
    }
}
