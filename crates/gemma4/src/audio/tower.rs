//! The Gemma 4 audio tower (`Gemma4AudioModel`, a USM-style conformer): log-mel frames in,
//! soft tokens out (`output_proj_dims` wide, before `embed_audio`).
//!
//! ```text
//! subsample: 2 × { x·mask → Conv2d 3×3 stride 2 pad 1 (no bias) → LayerNorm over channels
//!                  (no bias) → ReLU;  mask = mask[::2] }   → [T/4, F/4·C] → input_proj_linear
//! N × conformer layer:
//!   x = ffw(x)                                   ffw(x) = x + r·post_norm(clip(W2 silu(W1 pre_norm(clip(x)))))
//!   x = x + norm_post_attn(clip(attn(norm_pre_attn(clip(x)))))
//!   x = x + W_end silu(conv_norm(clip(depthwise_causal_conv(glu(W_start pre_norm(x))))))
//!   x = norm_out(clip(ffw2(x)))
//! output_proj (with bias); frames whose mask is false are dropped
//! ```
//! `clip` is the config's `gradient_clipping` (±1e10, effectively off in f32); `r` is
//! `residual_weight` (0.5). The depthwise convolution is causal: `kernel − 1` zeros on the
//! left. Linears inside the layers are clippable, with bounds from the checkpoint. The
//! attention is [`crate::audio::attention`].

use candle_core::{DType, Tensor};

use crate::audio::attention::{relative_positions, AudioAttention};
use crate::audio::features::AudioFeatures;
use crate::config::audio::AudioConfig;
use crate::error::{Error, Result};
use crate::loading::weights::Weights;
use crate::nn::linear::Linear;
use crate::nn::norm::{LayerNorm, RmsNorm};

fn clip(x: &Tensor, bound: f64) -> Result<Tensor> {
    // min(gradient_clipping, finfo(dtype).max)
    let max = match x.dtype() {
        DType::F16 => 65504.0,
        DType::BF16 => 3.3895313892515355e38,
        _ => f32::MAX as f64,
    };
    let b = bound.min(max);
    Ok(x.clamp(-b, b)?)
}

/// Every other entry, from the first: `mask[::2]`.
fn every_other(mask: &[bool]) -> Vec<bool> {
    mask.iter().step_by(2).copied().collect()
}

struct SubsampleLayer {
    /// f32: candle's CPU convolution has no bf16 matmul; f32 accumulation then rounding
    /// is what the reference's bf16 convolution computes too.
    conv: Tensor,
    norm: LayerNorm,
}

impl SubsampleLayer {
    fn new(cin: usize, cout: usize, eps: f64, w: &Weights) -> Result<Self> {
        Ok(SubsampleLayer {
            conv: w.get_f32(&[cout, cin, 3, 3], "conv.weight")?,
            norm: LayerNorm::without_bias(cout, eps, w, "norm")?,
        })
    }

    /// `x` `[1, C, T, F]`, `mask` over T.
    fn forward(&self, x: &Tensor, mask: &[bool]) -> Result<Tensor> {
        let m = Tensor::from_vec(
            mask.iter()
                .map(|&b| if b { 1f32 } else { 0f32 })
                .collect::<Vec<_>>(),
            (1, 1, mask.len(), 1),
            x.device(),
        )?
        .to_dtype(x.dtype())?;
        let x = x
            .broadcast_mul(&m)?
            .to_dtype(DType::F32)?
            .conv2d(&self.conv, 1, 2, 1, 1)?
            .to_dtype(x.dtype())?;
        let x = self.norm.forward(&x.permute((0, 2, 3, 1))?)?.relu()?;
        Ok(x.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

struct FeedForward {
    pre_layer_norm: RmsNorm,
    ffw_layer_1: Linear,
    ffw_layer_2: Linear,
    post_layer_norm: RmsNorm,
    residual_weight: f64,
    clip: f64,
}

impl FeedForward {
    fn new(cfg: &AudioConfig, w: &Weights) -> Result<Self> {
        let (h, c) = (cfg.hidden_size, cfg.use_clipped_linears);
        Ok(FeedForward {
            // The reference builds these two norms with the default eps (1e-6).
            pre_layer_norm: RmsNorm::new(h, 1e-6, w, "pre_layer_norm")?,
            ffw_layer_1: Linear::clippable(h, 4 * h, w, "ffw_layer_1", c)?,
            ffw_layer_2: Linear::clippable(4 * h, h, w, "ffw_layer_2", c)?,
            post_layer_norm: RmsNorm::new(h, 1e-6, w, "post_layer_norm")?,
            residual_weight: cfg.residual_weight,
            clip: cfg.gradient_clipping,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.pre_layer_norm.forward(&clip(x, self.clip)?)?;
        let y = self
            .ffw_layer_2
            .forward(&self.ffw_layer_1.forward(&y)?.silu()?)?;
        let y = self.post_layer_norm.forward(&clip(&y, self.clip)?)?;
        Ok((y.affine(self.residual_weight, 0.0)? + x)?)
    }
}

struct LightConv {
    pre_layer_norm: RmsNorm,
    linear_start: Linear,
    /// Depthwise kernel `[hidden, kernel]`.
    kernel: Tensor,
    conv_norm: RmsNorm,
    linear_end: Linear,
    clip: f64,
}

impl LightConv {
    fn new(cfg: &AudioConfig, w: &Weights) -> Result<Self> {
        let (h, c, k) = (
            cfg.hidden_size,
            cfg.use_clipped_linears,
            cfg.conv_kernel_size,
        );
        Ok(LightConv {
            pre_layer_norm: RmsNorm::new(h, cfg.rms_norm_eps, w, "pre_layer_norm")?,
            linear_start: Linear::clippable(h, 2 * h, w, "linear_start", c)?,
            kernel: w
                .get(&[h, 1, k], "depthwise_conv1d.weight")?
                .reshape((h, k))?,
            conv_norm: RmsNorm::new(h, cfg.rms_norm_eps, w, "conv_norm")?,
            linear_end: Linear::clippable(h, h, w, "linear_end", c)?,
            clip: cfg.gradient_clipping,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        let y = self
            .linear_start
            .forward(&self.pre_layer_norm.forward(x)?)?;
        // GLU over the last dimension: first half · sigmoid(second half).
        let y = (y.narrow(1, 0, h)? * candle_nn::ops::sigmoid(&y.narrow(1, h, h)?)?)?;
        // Causal depthwise conv: out[t] = Σ_j kernel[:, j] · y[t − (K−1) + j].
        let k = self.kernel.dim(1)?;
        let yp = y.pad_with_zeros(0, k - 1, 0)?;
        let mut acc: Option<Tensor> = None;
        for j in 0..k {
            let term = yp
                .narrow(0, j, t)?
                .broadcast_mul(&self.kernel.narrow(1, j, 1)?.reshape((1, h))?)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        let y = acc.expect("kernel size is positive");
        let y = self.conv_norm.forward(&clip(&y, self.clip)?)?.silu()?;
        Ok((self.linear_end.forward(&y)? + x)?)
    }
}

struct ConformerLayer {
    feed_forward1: FeedForward,
    norm_pre_attn: RmsNorm,
    self_attn: AudioAttention,
    norm_post_attn: RmsNorm,
    lconv1d: LightConv,
    feed_forward2: FeedForward,
    norm_out: RmsNorm,
    clip: f64,
}

impl ConformerLayer {
    fn new(cfg: &AudioConfig, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        let norm = |n: &str| RmsNorm::new(h, 1e-6, w, n);
        Ok(ConformerLayer {
            feed_forward1: FeedForward::new(cfg, &w.pp("feed_forward1"))?,
            norm_pre_attn: norm("norm_pre_attn")?,
            self_attn: AudioAttention::new(cfg, &w.pp("self_attn"))?,
            norm_post_attn: norm("norm_post_attn")?,
            lconv1d: LightConv::new(cfg, &w.pp("lconv1d"))?,
            feed_forward2: FeedForward::new(cfg, &w.pp("feed_forward2"))?,
            norm_out: norm("norm_out")?,
            clip: cfg.gradient_clipping,
        })
    }

    fn forward(&self, x: &Tensor, pos: &Tensor, valid: &[bool]) -> Result<Tensor> {
        let x = self.feed_forward1.forward(x)?;
        let a = self.norm_pre_attn.forward(&clip(&x, self.clip)?)?;
        let a = self.self_attn.forward(&a, pos, valid)?;
        let x = (self.norm_post_attn.forward(&clip(&a, self.clip)?)? + x)?;
        let x = self.lconv1d.forward(&x)?;
        let x = self.feed_forward2.forward(&x)?;
        self.norm_out.forward(&clip(&x, self.clip)?)
    }
}

pub struct AudioTower {
    cfg: AudioConfig,
    layer0: SubsampleLayer,
    layer1: SubsampleLayer,
    input_proj_linear: Linear,
    layers: Vec<ConformerLayer>,
    output_proj: Linear,
}

impl AudioTower {
    /// `w` is rooted at `model.audio_tower.`.
    pub fn new(cfg: &AudioConfig, w: &Weights) -> Result<Self> {
        let [c0, c1] = cfg.subsampling_conv_channels;
        let s = w.pp("subsample_conv_projection");
        Ok(AudioTower {
            cfg: cfg.clone(),
            layer0: SubsampleLayer::new(1, c0, cfg.rms_norm_eps, &s.pp("layer0"))?,
            layer1: SubsampleLayer::new(c0, c1, cfg.rms_norm_eps, &s.pp("layer1"))?,
            input_proj_linear: Linear::new(
                cfg.proj_input_dim(),
                cfg.hidden_size,
                &s,
                "input_proj_linear",
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ConformerLayer::new(cfg, &w.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            output_proj: Linear::with_bias(
                cfg.hidden_size,
                cfg.output_proj_dims,
                w,
                "output_proj",
            )?,
        })
    }

    pub fn config(&self) -> &AudioConfig {
        &self.cfg
    }

    /// Every projection: the subsampler's, each conformer layer's (feed-forwards,
    /// attention, convolution block), the output's.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.input_proj_linear];
        for l in &self.layers {
            for ff in [&l.feed_forward1, &l.feed_forward2] {
                v.extend([&ff.ffw_layer_1, &ff.ffw_layer_2]);
            }
            v.extend(l.self_attn.linears());
            v.extend([&l.lconv1d.linear_start, &l.lconv1d.linear_end]);
        }
        v.push(&self.output_proj);
        v
    }

    /// Every output frame `[T/4, output_proj_dims]` with its mask (the reference's
    /// `last_hidden_state` and `attention_mask`).
    pub fn forward_all(&self, f: &AudioFeatures) -> Result<(Tensor, Vec<bool>)> {
        self.forward_all_as(f, self.output_proj.dtype())
    }

    /// [`Self::forward_all`] with activations in `dtype` whatever the weights' (training
    /// computes in f32 over a bf16 base).
    pub fn forward_all_as(&self, f: &AudioFeatures, dtype: DType) -> Result<(Tensor, Vec<bool>)> {
        let device = self.output_proj.device();
        let x = Tensor::from_slice(&f.features, (1, 1, f.num_frames, f.dim), &device)?
            .to_dtype(dtype)?;
        let x = self.layer0.forward(&x, &f.mask)?;
        let mask = every_other(&f.mask);
        let x = self.layer1.forward(&x, &mask)?;
        let mask = every_other(&mask);
        let (_, c, t, fr) = x.dims4()?;
        if c * fr != self.cfg.proj_input_dim() {
            return Err(Error::invalid_argument(
                "audio",
                format!(
                    "{} mel bins subsample to {fr} bins × {c} channels = {} features per frame, but `input_proj_linear` takes {}",
                    f.dim,
                    c * fr,
                    self.cfg.proj_input_dim()
                ),
            ));
        }
        let mut x = self
            .input_proj_linear
            .forward(&x.permute((0, 2, 3, 1))?.reshape((t, fr * c))?)?;
        let pos = relative_positions(&self.cfg, &device)?.to_dtype(dtype)?;
        for layer in &self.layers {
            x = layer.forward(&x, &pos, &mask)?;
        }
        Ok((self.output_proj.forward(&x)?, mask))
    }

    /// The soft tokens of the valid frames `[num_soft_tokens, output_proj_dims]`.
    pub fn forward(&self, f: &AudioFeatures) -> Result<Tensor> {
        self.forward_as(f, self.output_proj.dtype())
    }

    /// [`Self::forward`] with activations in `dtype`.
    pub fn forward_as(&self, f: &AudioFeatures, dtype: DType) -> Result<Tensor> {
        let (x, mask) = self.forward_all_as(f, dtype)?;
        let keep: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize])
            .collect();
        let idx = Tensor::new(keep.as_slice(), x.device())?;
        Ok(x.index_select(&idx, 0)?)
    }
}
