//! The Gemma 4 vision tower (`Gemma4VisionModel`): image patches in, soft tokens out.
//!
//! ```text
//! e = input_proj(2·(pixels − 0.5)) + table[0][x] + table[1][y]
//! N × { h += post_attn_norm(attn(input_norm(h)));  h += post_ffn_norm(mlp(pre_ffn_norm(h))) }
//! soft = mean of each k×k patch group (f32, rounded back)  ·  √hidden (f32)
//! large tower: soft = (soft − std_bias) · std_scale
//! ```
//! Attention is the decoder's [`Attention`] (q/k norms, weightless v norm, scaling 1.0),
//! bidirectional over the image's patches, with 2-D RoPE: the first half of each head
//! rotates with the patch column, the second half with its row, θ = 100, `D/4`
//! frequencies per axis. There is no final norm. Clippable linears (small tower) clamp
//! their inputs and outputs. Padding patches of the reference are never built (they are
//! masked as keys and dropped after pooling), see [`crate::vision::image_processor`].

use candle_core::{DType, Device, Tensor};

use crate::config::vision::VisionConfig;
use crate::error::{Error, Result};
use crate::loading::weights::Weights;
use crate::nn::linear::Linear;
use crate::nn::norm::RmsNorm;
use crate::nn::rope::{self, Rope};
use crate::text::attention::Attention;
use crate::text::mlp::Mlp;
use crate::vision::image_processor::ProcessedImage;

struct VisionLayer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

impl VisionLayer {
    fn new(cfg: &VisionConfig, w: &Weights) -> Result<Self> {
        let (h, i, clip) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.use_clipped_linears,
        );
        let m = w.pp("mlp");
        let norm = |n: &str| RmsNorm::new(h, cfg.rms_norm_eps, w, n);
        Ok(VisionLayer {
            attn: Attention::vision(cfg, &w.pp("self_attn"))?,
            mlp: Mlp::from_parts(
                Linear::clippable(h, i, &m, "gate_proj", clip)?,
                Linear::clippable(h, i, &m, "up_proj", clip)?,
                Linear::clippable(i, h, &m, "down_proj", clip)?,
            ),
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
        })
    }

    fn forward(&self, h: &Tensor, rot: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let x = self.input_layernorm.forward(h)?;
        let q = self.attn.queries(&x, rot)?;
        let (k, v) = self.attn.keys_values(&x, rot)?;
        let a = self.attn.attend(&q, &k, &v, None)?;
        let h = (h + self.post_attention_layernorm.forward(&a)?)?;
        let m = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&h)?)?;
        Ok((h + self.post_feedforward_layernorm.forward(&m)?)?)
    }
}

pub struct VisionTower {
    cfg: VisionConfig,
    input_proj: Linear,
    /// `[2, position_embedding_size, hidden]`: column table, row table.
    position_table: Tensor,
    layers: Vec<VisionLayer>,
    /// f32 `std_bias`, `std_scale` of the large tower.
    standardize: Option<(Tensor, Tensor)>,
    /// `D/4` frequencies, shared by both axes.
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl VisionTower {
    /// `w` is rooted at `model.vision_tower.`.
    pub fn new(cfg: &VisionConfig, w: &Weights) -> Result<Self> {
        let (h, p) = (cfg.hidden_size, cfg.patch_size);
        let pe = w.pp("patch_embedder");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionLayer::new(cfg, &w.pp("encoder.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let standardize = if cfg.standardize {
            Some((w.get_f32(&[h], "std_bias")?, w.get_f32(&[h], "std_scale")?))
        } else {
            None
        };
        // `1 / θ^(2i / (D/2))` for i < D/4, in f32 as the reference computes it.
        let spatial = cfg.head_dim / 2;
        let rope = Rope::from_inv_freq(
            (0..spatial / 2)
                .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / spatial as f32))
                .collect(),
        );
        Ok(VisionTower {
            input_proj: Linear::new(3 * p * p, h, &pe, "input_proj")?,
            position_table: pe.get(
                &[2, cfg.position_embedding_size, h],
                "position_embedding_table",
            )?,
            layers,
            standardize,
            rope,
            dtype: w.dtype,
            device: w.device.clone(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Every projection: the patch embedding's, then each layer's attention and MLP.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.input_proj];
        for l in &self.layers {
            v.extend(l.attn.linears());
            v.extend(l.mlp.linears());
        }
        v
    }

    /// The tower's soft tokens `[num_soft_tokens, hidden]` for one image (before the
    /// projector), in the compute dtype.
    pub fn forward(&self, img: &ProcessedImage) -> Result<Tensor> {
        self.forward_as(img, self.dtype)
    }

    /// [`Self::forward`] with activations in `dt` whatever the weights' dtype (training
    /// computes in f32 over a bf16 base, as the decoder does).
    pub fn forward_as(&self, img: &ProcessedImage, dt: DType) -> Result<Tensor> {
        let (p, k) = (self.cfg.patch_size, self.cfg.pooling_kernel_size);
        let n = img.num_patches();
        if img.patch_dim != 3 * p * p {
            return Err(Error::invalid_argument(
                "image",
                format!(
                    "patches of {} values do not fit the tower's {p}-pixel patches",
                    img.patch_dim
                ),
            ));
        }
        let xs: Vec<usize> = img.positions.iter().map(|q| q[0]).collect();
        let ys: Vec<usize> = img.positions.iter().map(|q| q[1]).collect();
        let (pw, ph) = (
            xs.iter().max().map_or(0, |m| m + 1),
            ys.iter().max().map_or(0, |m| m + 1),
        );
        if pw.max(ph) > self.cfg.position_embedding_size {
            return Err(Error::invalid_argument(
                "image",
                format!(
                    "{pw}x{ph} patches exceed the tower's position table of {}",
                    self.cfg.position_embedding_size
                ),
            ));
        }
        if pw % k != 0 || ph % k != 0 {
            return Err(Error::invalid_argument(
                "image",
                format!("a {pw}x{ph} patch grid cannot be pooled {k}x{k}"),
            ));
        }

        let pixels = Tensor::from_slice(&img.pixel_values, (n, img.patch_dim), &self.device)?;
        let pixels = pixels.affine(2.0, -1.0)?.to_dtype(dt)?;
        let idx = |v: &[usize]| -> Result<Tensor> {
            let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
            Ok(Tensor::new(v.as_slice(), &self.device)?)
        };
        let pos = (self.position_table.get(0)?.index_select(&idx(&xs)?, 0)?
            + self.position_table.get(1)?.index_select(&idx(&ys)?, 0)?)?
        .to_dtype(dt)?;
        let mut h = (self.input_proj.forward(&pixels)? + pos)?;

        let (cos_x, sin_x) = self.rope.cos_sin(&xs, dt, &self.device)?;
        let (cos_y, sin_y) = self.rope.cos_sin(&ys, dt, &self.device)?;
        let half = self.cfg.head_dim / 2;
        let rot = |t: &Tensor| -> Result<Tensor> {
            let a = rope::apply(&t.narrow(2, 0, half)?, &cos_x, &sin_x)?;
            let b = rope::apply(&t.narrow(2, half, half)?, &cos_y, &sin_y)?;
            Ok(Tensor::cat(&[a, b], 2)?)
        };
        for layer in &self.layers {
            h = layer.forward(&h, &rot)?;
        }

        // k×k average pooling in f32 as the reference's one-hot matmul: soft token
        // `x/k + (W/k)·(y/k)` (row-major over the pooled grid) averages its k² patches.
        let hf = h.to_dtype(DType::F32)?;
        let groups = (pw / k) * (ph / k);
        let mut weights = vec![0f32; groups * n];
        for (i, (&x, &y)) in xs.iter().zip(&ys).enumerate() {
            weights[(x / k + (pw / k) * (y / k)) * n + i] = 1.0 / (k * k) as f32;
        }
        let weights = Tensor::from_vec(weights, (groups, n), &self.device)?;
        let pooled = weights.matmul(&hf)?.to_dtype(dt)?;
        let root = (self.cfg.hidden_size as f64).sqrt() as f32;
        let mut soft = pooled
            .to_dtype(DType::F32)?
            .broadcast_mul(&Tensor::new(root, &self.device)?)?;
        if let Some((bias, scale)) = &self.standardize {
            soft = soft.broadcast_sub(bias)?.broadcast_mul(scale)?;
        }
        Ok(soft.to_dtype(dt)?)
    }
}
