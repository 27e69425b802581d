//! The centroid head of E2B/E4B's drafters (`Gemma4AssistantMaskedEmbedder`): instead of
//! scoring the whole vocabulary, score `num_centroids` cluster centroids, keep the top
//! `k` clusters, and score only their tokens against the tied embedding. Every other
//! token gets the smallest selected logit minus one, so it can never win an argmax and
//! stays far below the chosen ones in a softmax.
//!
//! `token_ordering` lists the vocabulary cluster by cluster: cluster `c` holds
//! `token_ordering[c·m .. (c+1)·m]` with `m = vocab / num_centroids`.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::loading::weights::{Checkpoint, Weights};
use crate::nn::linear::Linear;

pub struct CentroidHead {
    centroids: Linear,
    token_ordering: Vec<u32>,
    num_centroids: usize,
    top_k: usize,
    vocab: usize,
}

impl CentroidHead {
    /// `w` is rooted at the drafter (`masked_embedding.*` below it).
    pub fn new(
        ckpt: &Checkpoint,
        w: &Weights,
        hidden: usize,
        vocab: usize,
        (num_centroids, top_k): (usize, usize),
    ) -> Result<Self> {
        let centroids = Linear::new(hidden, num_centroids, w, "masked_embedding.centroids")?;
        let name = w.name("masked_embedding.token_ordering");
        let order = ckpt.load_i64(&name, &[vocab])?;
        let token_ordering = order
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        Error::invalid_argument(
                            name.clone(),
                            format!("holds {t}, outside the vocabulary of {vocab}"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CentroidHead {
            centroids,
            token_ordering,
            num_centroids,
            top_k,
            vocab,
        })
    }

    /// f32 logits `[1, vocab]` of the final hidden state `h` `[1, hidden]`, with `embed`
    /// the tied head `[vocab, hidden]`.
    pub fn forward(&self, h: &Tensor, embed: &Linear) -> Result<Tensor> {
        let scores: Vec<f32> = self
            .centroids
            .forward(h)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        // torch.topk: the k largest, ties to the lower index.
        let mut order: Vec<usize> = (0..self.num_centroids).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let per = self.vocab / self.num_centroids;
        let ids: Vec<u32> = order[..self.top_k]
            .iter()
            .flat_map(|&c| self.token_ordering[c * per..(c + 1) * per].iter().copied())
            .collect();
        let idx = Tensor::new(ids.as_slice(), h.device())?;
        let rows = embed.weight().rows(&idx, h.dtype())?; // [k·m, hidden]
        let selected: Vec<f32> = h
            .matmul(&rows.t()?)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        // The reference takes `min().item() - 1.0` in Python and fills in the compute dtype.
        let min = selected.iter().copied().fold(f32::INFINITY, f32::min);
        let mask = crate::text::model::round_to(h.dtype(), min as f64 - 1.0) as f32;
        let mut out = vec![mask; self.vocab];
        for (&id, &v) in ids.iter().zip(&selected) {
            out[id as usize] = v;
        }
        Ok(Tensor::from_vec(out, (1, self.vocab), h.device())?)
    }
}
