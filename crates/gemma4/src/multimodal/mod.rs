//! Multimodal prompts: placeholder expansion (`Gemma4Processor`), the image encoder of a
//! checkpoint (tower + projector, or the 12B's embedder + projector), and the splice of
//! soft tokens into the prompt embeddings (`Gemma4Model.forward`). The audio encoder is
//! [`crate::audio::encoder`].
//!
//! Expansion, as the processor: the k-th `<|image|>` in the text becomes
//! `<|image>` + n×`<|image|>` + `<image|>` (n = that image's soft tokens); the k-th
//! `<|video|>` becomes, per sampled frame, `mm:ss <|image>` + n×`<|video|>` + `<image|>`,
//! frames joined by a space; the k-th `<|audio|>` becomes `<|audio>` + n×`<|audio|>` +
//! `<audio|>` (n = that clip's valid frames after the tower's 4× subsampling, or its
//! 640-sample frames on the 12B). Newlines around a marker come from the chat template,
//! not from the expansion. Then: placeholder ids are embedded as the pad token, soft tokens
//! overwrite them in reading order, the per-layer embeddings read the pad id there, and
//! each contiguous run of image or video placeholders is one span for the bidirectional
//! attention overlay (audio placeholders stay causal, as in the reference).

pub mod embedder;

use candle_core::{DType, Device, Tensor};

use crate::audio::encoder::AudioEncoder;
use crate::audio::features::AudioFeatures;
use crate::config::vision::{MultimodalTokens, VisionSpec};
use crate::error::{Error, Result};
use crate::loading::weights::{Checkpoint, Weights};
use crate::multimodal::embedder::MultimodalEmbedder;
use crate::text::model::{PromptInput, TextModel};
use crate::vision::image_embedder::ImageEmbedder;
use crate::vision::image_processor::{PatchLayout, ProcessedImage};
use crate::vision::tower::VisionTower;
use crate::vision::video::{timestamp, ProcessedVideo};

/// The image encoder of a checkpoint.
pub enum VisionEncoder {
    /// `model.vision_tower.` + `model.embed_vision.`
    Tower {
        tower: VisionTower,
        projector: MultimodalEmbedder,
    },
    /// 12B: `model.vision_embedder.` + `model.embed_vision.`
    Unified {
        embedder: ImageEmbedder,
        projector: MultimodalEmbedder,
    },
}

impl VisionEncoder {
    pub fn load(
        spec: &VisionSpec,
        text_hidden: usize,
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let proj_w = Weights::new(ckpt, "model.embed_vision.", dtype, device);
        Ok(match spec {
            VisionSpec::Tower(c) => VisionEncoder::Tower {
                tower: VisionTower::new(
                    c,
                    &Weights::new(ckpt, "model.vision_tower.", dtype, device),
                )?,
                projector: MultimodalEmbedder::new(
                    c.hidden_size,
                    text_hidden,
                    c.rms_norm_eps,
                    &proj_w,
                )?,
            },
            VisionSpec::Unified(c) => VisionEncoder::Unified {
                embedder: ImageEmbedder::new(
                    c,
                    &Weights::new(ckpt, "model.vision_embedder.", dtype, device),
                )?,
                projector: MultimodalEmbedder::new(
                    c.output_proj_dims,
                    text_hidden,
                    c.rms_norm_eps,
                    &proj_w,
                )?,
            },
        })
    }

    /// Every projection of the encoder and its projector (what LoRA adapters patch).
    pub fn linears(&self) -> Vec<&crate::nn::linear::Linear> {
        match self {
            VisionEncoder::Tower { tower, projector } => {
                [tower.linears(), projector.linears()].concat()
            }
            VisionEncoder::Unified {
                embedder,
                projector,
            } => [embedder.linears(), projector.linears()].concat(),
        }
    }

    /// The patch layout the image processor must produce for this encoder.
    pub fn layout(&self) -> PatchLayout {
        match self {
            VisionEncoder::Tower { .. } => PatchLayout::Tower,
            VisionEncoder::Unified { .. } => PatchLayout::Merged,
        }
    }

    /// The encoder's output before the projector (`Gemma4VisionModel`'s soft tokens, or the
    /// 12B embedder's `last_hidden_state`).
    pub fn encode(&self, img: &ProcessedImage) -> Result<Tensor> {
        match self {
            VisionEncoder::Tower { tower, .. } => tower.forward(img),
            VisionEncoder::Unified { embedder, .. } => embedder.forward(img),
        }
    }

    /// Soft tokens in the text width `[num_soft_tokens, text_hidden]`.
    pub fn embed(&self, img: &ProcessedImage) -> Result<Tensor> {
        self.embed_as(img, None)
    }

    /// [`Self::embed`], the tower's activations in `dt` when given (training's f32).
    pub fn embed_as(&self, img: &ProcessedImage, dt: Option<DType>) -> Result<Tensor> {
        let x = match (self, dt) {
            (VisionEncoder::Tower { tower, .. }, Some(dt)) => tower.forward_as(img, dt)?,
            _ => self.encode(img)?,
        };
        match self {
            VisionEncoder::Tower { projector, .. } | VisionEncoder::Unified { projector, .. } => {
                projector.forward(&x)
            }
        }
    }
}

/// Token strings of the multimodal control tokens, looked up from their config ids.
#[derive(Debug, Clone)]
pub struct MarkerStrings {
    pub image: String,
    pub video: String,
    pub audio: String,
    pub boi: String,
    pub eoi: String,
    pub boa: String,
    pub eoa: String,
}

/// Images, videos and audio clips of a prompt, processed for their encoders, in the order
/// of their markers.
#[derive(Debug, Clone, Default)]
pub struct ProcessedMedia {
    pub images: Vec<ProcessedImage>,
    pub videos: Vec<ProcessedVideo>,
    pub audio: Vec<AudioFeatures>,
}

impl ProcessedMedia {
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.videos.is_empty() && self.audio.is_empty()
    }
}

/// Expands every image, video and audio marker of `text` as the reference processor does.
pub fn expand_prompt(text: &str, m: &MarkerStrings, media: &ProcessedMedia) -> Result<String> {
    for (marker, n, arg, what) in [
        (&m.image, media.images.len(), "images", "image(s)"),
        (&m.video, media.videos.len(), "videos", "video(s)"),
        (&m.audio, media.audio.len(), "audio", "audio clip(s)"),
    ] {
        let found = text.matches(marker.as_str()).count();
        if found != n {
            return Err(Error::invalid_argument(
                arg,
                format!("the prompt has {found} {marker} marker(s) but {n} {what} were given"),
            ));
        }
    }
    let (mut out, mut rest) = (String::with_capacity(text.len()), text);
    let (mut imgs, mut vids, mut clips) =
        (media.images.iter(), media.videos.iter(), media.audio.iter());
    loop {
        // The earliest marker next; a marker is never a prefix of another.
        let next = [&m.image, &m.video, &m.audio]
            .into_iter()
            .enumerate()
            .filter_map(|(k, mk)| rest.find(mk.as_str()).map(|at| (at, k)))
            .min();
        let Some((at, kind)) = next else { break };
        out.push_str(&rest[..at]);
        match kind {
            0 => {
                let img = imgs.next().expect("counted above");
                out.push_str(&m.boi);
                out.push_str(&m.image.repeat(img.num_soft_tokens));
                out.push_str(&m.eoi);
                rest = &rest[at + m.image.len()..];
            }
            1 => {
                let vid = vids.next().expect("counted above");
                let n = vid.soft_tokens_per_frame();
                let frames: Vec<String> = vid
                    .timestamps
                    .iter()
                    .map(|&t| format!("{} {}{}{}", timestamp(t), m.boi, m.video.repeat(n), m.eoi))
                    .collect();
                out.push_str(&frames.join(" "));
                rest = &rest[at + m.video.len()..];
            }
            _ => {
                let clip = clips.next().expect("counted above");
                out.push_str(&m.boa);
                out.push_str(&m.audio.repeat(clip.num_soft_tokens));
                out.push_str(&m.eoa);
                rest = &rest[at + m.audio.len()..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Span id of every position: runs of image or video placeholders get 0, 1, …; text −1
/// (`get_block_sequence_ids_for_mask`).
pub fn span_ids(ids: &[u32], tokens: &MultimodalTokens) -> Vec<i64> {
    let mut next = 0;
    let mut prev = false;
    ids.iter()
        .map(|&id| {
            let v = id == tokens.image || id == tokens.video;
            let out = if v {
                if !prev {
                    next += 1;
                }
                next - 1
            } else {
                -1
            };
            prev = v;
            out
        })
        .collect()
}

/// `h0` `[S, hidden]` with row `slots[k]` replaced by row k of `soft`. A gather from
/// `[h0; soft]`, so the spliced rows are the soft tokens bit for bit.
pub fn splice(h0: &Tensor, slots: &[u32], soft: &Tensor) -> Result<Tensor> {
    let s = h0.dim(0)? as u32;
    let mut gather: Vec<u32> = (0..s).collect();
    for (k, &p) in slots.iter().enumerate() {
        gather[p as usize] = s + k as u32;
    }
    let idx = Tensor::new(gather.as_slice(), h0.device())?;
    let soft = soft.to_dtype(h0.dtype())?;
    Ok(Tensor::cat(&[h0, &soft], 0)?.index_select(&idx, 0)?)
}

/// The soft tokens of a multimodal sequence, encoded: rows `slots` of the input embeddings
/// are replaced by the rows of `rows` in order, the per-layer embeddings read `ple_ids`
/// (placeholders as the pad token), and `spans` marks the image/video spans for the
/// bidirectional overlay ([`span_ids`]).
#[derive(Debug, Clone)]
pub struct SoftTokens {
    pub slots: Vec<u32>,
    pub rows: Tensor,
    pub ple_ids: Vec<u32>,
    pub spans: Vec<i64>,
}

/// The placeholders of `id` in `ids` and the soft tokens `encode` gives for `inputs`, after
/// checking that the placeholders and the inputs' soft-token counts agree.
fn encode_kind<T>(
    ids: &[u32],
    (kind, id): (&str, u32),
    inputs: &[&T],
    count: impl Fn(&T) -> usize,
    encode: impl Fn(&T) -> Result<Tensor>,
) -> Result<Option<(Vec<u32>, Tensor)>> {
    let slots: Vec<u32> = (0..ids.len() as u32)
        .filter(|&p| ids[p as usize] == id)
        .collect();
    if slots.is_empty() && inputs.is_empty() {
        return Ok(None);
    }
    // Counts are known before encoding: check them first.
    let n: usize = inputs.iter().map(|f| count(f)).sum();
    if n != slots.len() {
        return Err(Error::invalid_argument(
            kind,
            format!(
                "{} {kind} placeholder token(s) in the prompt but the {kind} input(s) give {n} soft tokens",
                slots.len()
            ),
        ));
    }
    let rows = inputs
        .iter()
        .map(|f| encode(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((slots, Tensor::cat(&rows, 0)?)))
}

/// Encodes the images, video frames and audio clips of an expanded prompt `ids` with the
/// checkpoint's encoders: their soft tokens in the text width, where they go, and the
/// ids the per-layer embeddings read. `None` for a text-only prompt.
pub fn encode_media(
    text: &TextModel,
    vision: Option<&VisionEncoder>,
    audio: Option<&AudioEncoder>,
    tokens: &MultimodalTokens,
    ids: &[u32],
    media: &ProcessedMedia,
) -> Result<Option<SoftTokens>> {
    encode_media_as(text, vision, audio, tokens, ids, media, None)
}

/// [`encode_media`], the vision tower's activations in `dt` when given.
pub fn encode_media_as(
    text: &TextModel,
    vision: Option<&VisionEncoder>,
    audio: Option<&AudioEncoder>,
    tokens: &MultimodalTokens,
    ids: &[u32],
    media: &ProcessedMedia,
    dt: Option<DType>,
) -> Result<Option<SoftTokens>> {
    let pad = text.config().pad_token_id;
    let is_mm = |id: u32| id == tokens.image || id == tokens.video || id == tokens.audio;
    if !ids.iter().any(|&i| is_mm(i)) && media.is_empty() {
        return Ok(None);
    }
    let no_encoder = |kind: &str, what: &str| {
        Error::invalid_argument(kind, format!("this checkpoint has no {what} encoder"))
    };
    let frames: Vec<&ProcessedImage> = media.videos.iter().flat_map(|v| v.frames.iter()).collect();
    let images: Vec<&ProcessedImage> = media.images.iter().collect();
    let clips: Vec<&AudioFeatures> = media.audio.iter().collect();
    let mut parts = Vec::new();
    for (kind, id, inputs) in [
        ("image", tokens.image, images),
        ("video", tokens.video, frames),
    ] {
        parts.extend(encode_kind(
            ids,
            (kind, id),
            &inputs,
            |f| f.num_soft_tokens,
            |f| {
                vision
                    .ok_or_else(|| no_encoder(kind, "vision"))?
                    .embed_as(f, dt)
            },
        )?);
    }
    parts.extend(encode_kind(
        ids,
        ("audio", tokens.audio),
        &clips,
        |f| f.num_soft_tokens,
        |f| {
            audio
                .ok_or_else(|| no_encoder("audio", "audio"))?
                .embed_as(f, dt)
        },
    )?);
    let slots: Vec<u32> = parts.iter().flat_map(|(s, _)| s.iter().copied()).collect();
    let rows = match parts.len() {
        0 => Tensor::zeros((0, text.config().hidden_size), text.dtype(), text.device())?,
        1 => parts.pop().expect("one part").1,
        _ => Tensor::cat(&parts.iter().map(|(_, r)| r).collect::<Vec<_>>(), 0)?,
    };
    Ok(Some(SoftTokens {
        slots,
        rows,
        ple_ids: ids
            .iter()
            .map(|&i| if is_mm(i) { pad } else { i })
            .collect(),
        spans: span_ids(ids, tokens),
    }))
}

/// Builds the decoder input of an expanded prompt: embeds the ids (placeholders as the pad
/// token), writes each image's, video frame's and audio clip's soft tokens over its
/// placeholders, and records the ids the per-layer embeddings read and the image spans.
pub fn build_input(
    text: &TextModel,
    vision: Option<&VisionEncoder>,
    audio: Option<&AudioEncoder>,
    tokens: &MultimodalTokens,
    ids: Vec<u32>,
    media: &ProcessedMedia,
) -> Result<PromptInput> {
    let Some(soft) = encode_media(text, vision, audio, tokens, &ids, media)? else {
        return Ok(PromptInput::text(ids));
    };
    let h0 = text.embed(&soft.ple_ids)?;
    let h0 = match soft.slots.is_empty() {
        true => h0,
        false => splice(&h0, &soft.slots, &soft.rows)?,
    };
    Ok(PromptInput {
        ids,
        embeds: Some(h0),
        ple_ids: soft.ple_ids,
        spans: Some(soft.spans),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn markers() -> MarkerStrings {
        MarkerStrings {
            image: "<I>".into(),
            video: "<V>".into(),
            audio: "<A>".into(),
            boi: "[".into(),
            eoi: "]".into(),
            boa: "{".into(),
            eoa: "}".into(),
        }
    }

    fn img(n: usize) -> ProcessedImage {
        ProcessedImage {
            pixel_values: vec![],
            positions: vec![],
            patch_dim: 0,
            num_soft_tokens: n,
            height: 0,
            width: 0,
        }
    }

    #[test]
    fn expansion_matches_the_processor_and_counts_markers() {
        let v = ProcessedVideo {
            frames: vec![img(2), img(2)],
            timestamps: vec![0.0, 61.0],
        };
        let clip = |n: usize| AudioFeatures {
            features: vec![],
            num_frames: 0,
            dim: 0,
            mask: vec![],
            num_soft_tokens: n,
            truncated_samples: 0,
        };
        let media = |images, videos, audio| ProcessedMedia {
            images,
            videos,
            audio,
        };
        let out = expand_prompt(
            "a<I>b<V>c<A><I>d<A>",
            &markers(),
            &media(vec![img(3), img(1)], vec![v], vec![clip(2), clip(1)]),
        )
        .unwrap();
        assert_eq!(
            out,
            "a[<I><I><I>]b00:00 [<V><V>] 01:01 [<V><V>]c{<A><A>}[<I>]d{<A>}"
        );
        let err =
            expand_prompt("<I><I>", &markers(), &media(vec![img(1)], vec![], vec![])).unwrap_err();
        assert!(
            err.to_string().contains("2 <I> marker(s) but 1 image(s)"),
            "{err}"
        );
        let err = expand_prompt(
            "<A>",
            &markers(),
            &media(vec![], vec![], vec![clip(1), clip(1)]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("`audio`")
                && err
                    .to_string()
                    .contains("1 <A> marker(s) but 2 audio clip(s)"),
            "{err}"
        );
        assert!(expand_prompt("none", &markers(), &media(vec![img(1)], vec![], vec![])).is_err());
    }

    #[test]
    fn spans_are_runs_of_placeholders() {
        let t = MultimodalTokens {
            image: 9,
            video: 8,
            ..Default::default()
        };
        assert_eq!(
            span_ids(&[1, 9, 9, 2, 9, 8, 8, 3], &t),
            vec![-1, 0, 0, -1, 1, 1, 1, -1]
        );
    }
}
