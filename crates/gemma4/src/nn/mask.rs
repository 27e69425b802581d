//! Attention masks of the text decoder: causal, sliding-window, and the bidirectional
//! overlay over image/video spans, for query positions over keys held in any order (a
//! sliding layer's ring). Additive f32 masks, `None` where every key is visible.

use candle_core::Tensor;

use crate::config::Bidirectional;
use crate::error::Result;

/// The position of a key slot that holds nothing (a ring slot never written, or truncated
/// away): never visible.
pub(crate) const EMPTY: usize = usize::MAX;

/// Image/video spans of a multimodal prompt for the bidirectional overlay: `blocks[i]` is
/// the span id (≥ 0) of absolute position `start + i`, or −1 for text; positions outside
/// the slice are text.
#[derive(Debug, Clone, Copy)]
pub struct SpanOverlay<'a> {
    pub blocks: &'a [i64],
    pub start: usize,
    pub mode: Bidirectional,
}

impl SpanOverlay<'_> {
    fn block(&self, pos: usize) -> i64 {
        pos.checked_sub(self.start)
            .and_then(|i| self.blocks.get(i))
            .copied()
            .unwrap_or(-1)
    }
}

/// Additive mask `[queries, keys]` for query positions `q_pos` over keys at absolute
/// positions `k_pos` (any order; empty ring slots, `usize::MAX`, are never visible): key j is visible to
/// query i iff `j ≤ i` and, for sliding layers, `j > i − W` (exactly W keys including
/// itself). With a span overlay, tokens of the same image span also see each other,
/// composed as [`Bidirectional`] describes. Returns `None` when every key is visible (the
/// common decode step).
pub fn causal_mask(
    q_pos: &[usize],
    k_pos: &[usize],
    window: Option<usize>,
    overlay: Option<&SpanOverlay>,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let visible = |i: usize, j: usize| {
        if j == EMPTY {
            return false;
        }
        let same_span = overlay.is_some_and(|o| {
            let b = o.block(i);
            b >= 0 && b == o.block(j)
        });
        visible(i, j, window, same_span, overlay.map(|o| o.mode))
    };
    let all = q_pos.iter().all(|&i| k_pos.iter().all(|&j| visible(i, j)));
    if all {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(q_pos.len() * k_pos.len());
    for &i in q_pos {
        for &j in k_pos {
            m.push(if visible(i, j) {
                0.0f32
            } else {
                f32::NEG_INFINITY
            });
        }
    }
    Ok(Some(Tensor::from_vec(
        m,
        (q_pos.len(), k_pos.len()),
        device,
    )?))
}

/// Whether the key at position `j` is visible to the query at position `i`: `j ≤ i` and,
/// for sliding layers, `j > i − W`; with a bidirectional mode, tokens of one image span
/// (`same_span`) also see each other, composed as [`Bidirectional`] describes.
pub(crate) fn visible(
    i: usize,
    j: usize,
    window: Option<usize>,
    same_span: bool,
    mode: Option<Bidirectional>,
) -> bool {
    let causal = j <= i;
    let in_window = window.is_none_or(|w| j + w > i);
    match mode {
        None | Some(Bidirectional::None) => causal && in_window,
        // Gemma4Model: full layers stay causal; sliding = window ∧ (causal ∨ span).
        Some(Bidirectional::Vision) if window.is_none() => causal,
        Some(Bidirectional::Vision) => in_window && (causal || same_span),
        // Gemma4UnifiedModel: every layer = its causal(+window) mask ∨ span.
        Some(Bidirectional::VisionAllLayers) => (causal && in_window) || same_span,
    }
}

/// Softmax-free check used by tests: the row-wise count of visible keys.
#[cfg(test)]
pub(crate) fn visible_counts(mask: &Tensor) -> Vec<usize> {
    let rows: Vec<Vec<f32>> = mask.to_vec2().unwrap();
    rows.iter()
        .map(|r| r.iter().filter(|x| x.is_finite()).count())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sliding_window_sees_exactly_w_keys() {
        let q: Vec<usize> = (0..12).collect();
        let m = causal_mask(&q, &q, Some(4), None, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(visible_counts(&m), [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4]);
        let rows: Vec<Vec<f32>> = m.to_vec2().unwrap();
        // Query 7 sees keys 4..=7.
        assert!(rows[7][3].is_infinite() && rows[7][4] == 0.0 && rows[7][7] == 0.0);
    }

    /// Keys in ring order (a sliding layer's cache) with a slot that holds nothing.
    #[test]
    fn keys_in_any_order_and_empty_slots() {
        let k = [8, 5, EMPTY, 6, 7];
        let rows: Vec<Vec<f32>> = causal_mask(&[7, 8], &k, Some(3), None, &Device::Cpu)
            .unwrap()
            .unwrap()
            .to_vec2()
            .unwrap();
        let seen = |r: &Vec<f32>| -> Vec<usize> {
            k.iter()
                .zip(r)
                .filter(|(_, m)| m.is_finite())
                .map(|(p, _)| *p)
                .collect()
        };
        assert_eq!(seen(&rows[0]), [5, 6, 7]);
        assert_eq!(seen(&rows[1]), [8, 6, 7]);
    }

    #[test]
    fn full_causal_and_decode_steps_need_no_mask() {
        let m = causal_mask(&[0, 1, 2], &[0, 1, 2], None, None, &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(visible_counts(&m), [1, 2, 3]);
        // Decode: one query over the kept W-1 keys plus itself.
        assert!(
            causal_mask(&[20], &[17, 18, 19, 20], Some(4), None, &Device::Cpu)
                .unwrap()
                .is_none()
        );
        assert!(causal_mask(
            &[20],
            &(0..21).collect::<Vec<_>>(),
            None,
            None,
            &Device::Cpu
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn span_overlay_compositions_follow_the_two_model_classes() {
        // Positions 0..8, an image span at 2..=6 (block 0), window 3.
        let blocks = [-1i64, -1, 0, 0, 0, 0, 0, -1];
        let q: Vec<usize> = (0..8).collect();
        let rows = |mode, window| -> Vec<Vec<f32>> {
            let o = SpanOverlay {
                blocks: &blocks,
                start: 0,
                mode,
            };
            causal_mask(&q, &q, window, Some(&o), &Device::Cpu)
                .unwrap()
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let sees = |r: &Vec<Vec<f32>>, i: usize, j: usize| r[i][j] == 0.0;
        // Gemma4, sliding: image token 2 sees the future tokens 3..=6 of its span...
        let g = rows(Bidirectional::Vision, Some(3));
        assert!(sees(&g, 2, 6) && sees(&g, 2, 4));
        // ...but token 6 no longer sees token 2 (window ∧ (causal ∨ span)), nor text after.
        assert!(!sees(&g, 6, 2) && sees(&g, 6, 4) && !sees(&g, 5, 7));
        // Gemma4, full layers: plain causal.
        let f = rows(Bidirectional::Vision, None);
        assert!(!sees(&f, 2, 3) && sees(&f, 6, 2));
        // 12B: the span overrides the window and applies on full layers too.
        let u = rows(Bidirectional::VisionAllLayers, Some(3));
        assert!(sees(&u, 6, 2) && sees(&u, 2, 6) && !sees(&u, 7, 2));
        let uf = rows(Bidirectional::VisionAllLayers, None);
        assert!(sees(&uf, 2, 6) && !sees(&uf, 1, 2));
    }
}
