//! One decoder layer (`Gemma4TextDecoderLayer`): sandwich norms around attention and the
//! feed-forward block, the optional MoE branch beside the dense MLP, the optional
//! per-layer-embedding gate, and the learned `layer_scalar` on the whole residual stream.
//!
//! ```text
//! h = h + post_attention_layernorm(attn(input_layernorm(h)))
//! m = mlp(pre_feedforward_layernorm(h))
//! MoE: m = post_ffn_norm_1(m) + post_ffn_norm_2(experts(pre_ffn_norm_2(h), router(h)))
//! h = h + post_feedforward_layernorm(m)
//! PLE: h = h + post_per_layer_input_norm(per_layer_projection(gelu(per_layer_input_gate(h)) · ple_ℓ))
//! h = h · layer_scalar
//! ```

use candle_core::Tensor;

use crate::config::{LayerSpec, TextConfig};
use crate::error::Result;
use crate::loading::weights::Weights;
use crate::nn::activation::gelu_mul;
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;
use crate::text::attention::{Attention, SeqStep};
use crate::text::mlp::Mlp;
use crate::text::moe::{Experts, Router};

struct MoeBranch {
    router: Router,
    experts: Experts,
    pre_norm: RmsNorm,
    post_norm_dense: RmsNorm,
    post_norm_experts: RmsNorm,
}

struct PleGate {
    gate: Linear,
    projection: Linear,
    norm: RmsNorm,
}

pub struct DecoderLayer {
    index: usize,
    spec: LayerSpec,
    attn: Attention,
    mlp: Mlp,
    moe: Option<MoeBranch>,
    ple: Option<PleGate>,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    layer_scalar: Tensor,
}

impl DecoderLayer {
    /// Every projection of the layer: attention, MLP, the MoE branch's router and
    /// experts, the per-layer-input gate.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = self.attn.linears();
        v.extend(self.mlp.linears());
        if let Some(m) = &self.moe {
            v.extend(m.router.linears());
            v.extend(m.experts.linears());
        }
        if let Some(p) = &self.ple {
            v.extend([&p.gate, &p.projection]);
        }
        v
    }

    /// Layer `index` of `cfg`; `w` is rooted at `layers.{index}`.
    pub fn new(cfg: &TextConfig, index: usize, w: &Weights) -> Result<Self> {
        let spec = cfg.layers.get(index).ok_or_else(|| {
            crate::error::Error::invalid_argument(
                "layer",
                format!("{index} is past the config's {} layers", cfg.layers.len()),
            )
        })?;
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let norm = |name: &str| RmsNorm::new(h, eps, w, name);
        let moe = match &cfg.moe {
            None => None,
            Some(m) => Some(MoeBranch {
                router: Router::new(h, m, eps, &w.pp("router"))?,
                experts: Experts::new(h, m, &w.pp("experts"))?,
                pre_norm: norm("pre_feedforward_layernorm_2")?,
                post_norm_dense: norm("post_feedforward_layernorm_1")?,
                post_norm_experts: norm("post_feedforward_layernorm_2")?,
            }),
        };
        let p = cfg.hidden_size_per_layer_input;
        let ple = if p > 0 {
            Some(PleGate {
                gate: Linear::new(h, p, w, "per_layer_input_gate")?,
                projection: Linear::new(p, h, w, "per_layer_projection")?,
                norm: norm("post_per_layer_input_norm")?,
            })
        } else {
            None
        };
        Ok(DecoderLayer {
            index,
            spec: spec.clone(),
            attn: Attention::new(h, cfg.num_attention_heads, spec, eps, &w.pp("self_attn"))?,
            mlp: Mlp::new(h, spec.intermediate_size, &w.pp("mlp"))?,
            moe,
            ple,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            layer_scalar: w.get(&[1], "layer_scalar")?,
        })
    }

    /// Bytes of this layer's experts (0 without an MoE block).
    pub fn expert_bytes(&self) -> usize {
        self.moe.as_ref().map_or(0, |m| m.experts.size_in_bytes())
    }

    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// The layer over a batched step: `h` is the residual stream `[T, hidden]` of every
    /// sequence's rows, `rot` this layer type's RoPE at those rows' positions, `ple` this
    /// layer's per-layer inputs `[T, P]`. Attention reads and writes each sequence's own
    /// cache ([`Attention::forward`]); everything else is row-wise, so it runs once over
    /// all rows.
    pub(crate) fn forward(
        &self,
        h: &Tensor,
        rot: &dyn Fn(&Tensor) -> Result<Tensor>,
        ple: Option<&Tensor>,
        seqs: &mut [SeqStep<'_>],
    ) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?;
        let attn = self.attn.forward(&x, rot, self.index, &self.spec, seqs)?;
        self.finish(h, &attn, ple)
    }

    /// The layer over one whole sequence with no cache (what training runs): `mask` is
    /// this layer type's mask over the sequence, `shared` the keys and values `[K, S, D]`
    /// of this layer's producer when it shares them. Returns the residual stream and, for a
    /// layer that computes its own, its keys and values.
    #[allow(clippy::type_complexity)]
    pub(crate) fn forward_full(
        &self,
        h: &Tensor,
        rot: &dyn Fn(&Tensor) -> Result<Tensor>,
        ple: Option<&Tensor>,
        shared: Option<(&Tensor, &Tensor)>,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let x = self.input_layernorm.forward(h)?;
        let q = self.attn.queries(&x, rot)?;
        let (out, own) = match shared {
            Some((k, v)) => (self.attn.attend(&q, k, v, mask)?, None),
            None => {
                let (k, v) = self.attn.keys_values(&x, rot)?;
                (self.attn.attend(&q, &k, &v, mask)?, Some((k, v)))
            }
        };
        Ok((self.finish(h, &out, ple)?, own))
    }

    /// Everything after attention: `h` is the residual stream `[S, hidden]`, `attn_out` the
    /// attention output, `ple` this layer's per-layer input `[S, P]`.
    fn finish(&self, h: &Tensor, attn_out: &Tensor, ple: Option<&Tensor>) -> Result<Tensor> {
        let h = (h + self.post_attention_layernorm.forward(attn_out)?)?;
        let mut m = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        if let Some(moe) = &self.moe {
            let x = moe.pre_norm.forward(&h)?;
            let e = match crate::nn::autograd::tracked(&h) {
                true => {
                    let (routes, weights) = moe.router.route_differentiable(&h)?;
                    moe.experts.forward(&x, &routes, Some(&weights))?
                }
                false => moe.experts.forward(&x, &moe.router.route(&h)?, None)?,
            };
            m = (moe.post_norm_dense.forward(&m)? + moe.post_norm_experts.forward(&e)?)?;
        }
        let mut h = (h + self.post_feedforward_layernorm.forward(&m)?)?;
        if let (Some(g), Some(ple)) = (&self.ple, ple) {
            let x = gelu_mul(&g.gate.forward(&h)?, ple)?;
            h = (&h + g.norm.forward(&g.projection.forward(&x)?)?)?;
        }
        // The full-sequence path computes in f32 over a bf16 base.
        let scalar = self.layer_scalar.to_dtype(h.dtype())?;
        Ok(h.broadcast_mul(&scalar)?)
    }
}
