//! The key/value cache of one sequence, preallocated and written in place.
//!
//! Full-attention layers hold every position in a buffer `[kv_heads, capacity, head_dim]`
//! whose capacity doubles when a step needs more (or is reserved up front from the
//! sequence's length), so a decode step writes one row instead of copying the cache.
//! Sliding layers hold a ring: position `p` lives in slot `p % capacity`, and the
//! capacity is at least `W − 1` plus the step's tokens, so every key a query of the step
//! can see (the `W − 1` before the step and the step's own) is present while the step
//! runs. The slots are attended in ring order with a mask built from the position each
//! slot holds: softmax does not depend on the order of its keys, so this is the
//! reference's `DynamicSlidingWindowLayer` up to f32 rounding of the sums.
//!
//! KV-shared layers own nothing: they read their producer's buffers (the reference's
//! `shared_kv_states`). A cache can be forked (a deep copy, for a shared prefix) and
//! truncated (to drop rejected draft tokens or an edited tail), as long as the ring still
//! holds the window the shorter sequence needs.

use candle_core::{DType, Device, Tensor};

use crate::config::{KvSource, LayerType, TextConfig};
use crate::error::{Error, Result};

pub(crate) use crate::nn::mask::EMPTY;

/// Full-layer capacity granted on first use when nothing was reserved.
const MIN_FULL_CAPACITY: usize = 64;

#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    fn zeros(
        kv_heads: usize,
        cap: usize,
        head_dim: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        Ok(LayerKv {
            k: Tensor::zeros((kv_heads, cap, head_dim), dtype, dev)?,
            v: Tensor::zeros((kv_heads, cap, head_dim), dtype, dev)?,
        })
    }

    fn deep_copy(&self) -> Result<Self> {
        Ok(LayerKv {
            k: self.k.copy()?,
            v: self.v.copy()?,
        })
    }

    fn bytes(&self) -> usize {
        2 * self.k.elem_count() * self.k.dtype().size_in_bytes()
    }

    /// Writes `[K, n, D]` rows at slots `slot..slot + n`.
    fn write(&self, slot: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.k.slice_set(&k.contiguous()?, 1, slot)?;
        self.v.slice_set(&v.contiguous()?, 1, slot)?;
        Ok(())
    }

    /// A copy of this layer with capacity `cap`, positions `lo..hi` moved from slot
    /// `p % old` (or `p` for a linear buffer) to `p % cap`.
    fn resized(&self, cap: usize, lo: usize, hi: usize, ring: bool) -> Result<Self> {
        let (kh, old, d) = self.k.dims3()?;
        let out = LayerKv::zeros(kh, cap, d, self.k.dtype(), self.k.device())?;
        for (src, dst, n) in segments(lo, hi, old, cap, ring) {
            out.write(dst, &self.k.narrow(1, src, n)?, &self.v.narrow(1, src, n)?)?;
        }
        Ok(out)
    }
}

/// Runs `(source slot, destination slot, length)` that move positions `lo..hi` between
/// two buffers of capacities `from` and `to` (rings when `ring`, else slot = position).
fn segments(
    lo: usize,
    hi: usize,
    from: usize,
    to: usize,
    ring: bool,
) -> Vec<(usize, usize, usize)> {
    let slot = |p: usize, cap: usize| if ring { p % cap } else { p };
    let mut out = Vec::new();
    let mut p = lo;
    while p < hi {
        let (s, d) = (slot(p, from), slot(p, to));
        let mut n = hi - p;
        if ring {
            n = n.min(from - s).min(to - d);
        }
        out.push((s, d, n));
        p += n;
    }
    out
}

/// The cache of one sequence.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: its buffers once written (`None` before, and always for KV-shared layers).
    layers: Vec<Option<LayerKv>>,
    types: Vec<LayerType>,
    /// `[kv_heads, head_dim]` per layer.
    geometry: Vec<(usize, usize)>,
    owns: Vec<bool>,
    window: usize,
    seq_len: usize,
    /// Tokens of the step under way (0 between steps).
    pending: usize,
    /// Capacity of the full layers' buffers, in tokens.
    full_cap: usize,
    /// The position each slot of the sliding rings holds (every sliding layer's ring has
    /// this capacity and layout).
    ring: Vec<usize>,
    /// Slots ever written: the part of the ring a step attends over.
    ring_used: usize,
    /// Extra ring slots beyond `W − 1 + step`, so [`Self::truncate`] can go back that far.
    spare: usize,
}

impl Clone for KvCache {
    /// A deep copy ([`Self::fork`]): the buffers are written in place, so two caches
    /// must never share them.
    fn clone(&self) -> Self {
        self.fork().expect("copying a CPU tensor does not fail")
    }
}

impl KvCache {
    pub fn new(cfg: &TextConfig) -> Self {
        KvCache {
            layers: cfg.layers.iter().map(|_| None).collect(),
            types: cfg.layers.iter().map(|l| l.layer_type).collect(),
            geometry: cfg
                .layers
                .iter()
                .map(|l| (l.num_kv_heads, l.head_dim))
                .collect(),
            owns: cfg
                .layers
                .iter()
                .map(|l| l.kv_source == KvSource::Own)
                .collect(),
            window: cfg.sliding_window.max(1),
            seq_len: 0,
            pending: 0,
            full_cap: 0,
            ring: Vec::new(),
            ring_used: 0,
            spare: 0,
        }
    }

    /// Reserves room for `tokens` positions in the full layers (a sequence's prompt plus
    /// its `max_new_tokens`), so they are allocated once.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        self.grow_full(tokens)
    }

    /// Keeps `n` more ring slots than decoding needs, so the cache can be truncated by up
    /// to `n` tokens (speculative decoding's rejected drafts).
    pub fn with_spare(mut self, n: usize) -> Self {
        self.spare = n;
        self
    }

    /// The spare ring slots [`Self::with_spare`] asked for.
    pub fn spare(&self) -> usize {
        self.spare
    }

    /// Tokens processed so far (the position of the next token).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(LayerKv::bytes).sum()
    }

    /// Positions layer `layer` holds between steps: every one for full layers, the last
    /// `W − 1` (or fewer) for sliding layers, `None` for KV-shared layers.
    pub fn cached_len(&self, layer: usize) -> Option<usize> {
        if !*self.owns.get(layer)? {
            return None;
        }
        Some(match self.types[layer] {
            LayerType::Full => self.seq_len,
            LayerType::Sliding => {
                let lo = self.seq_len.saturating_sub(self.window - 1);
                self.ring
                    .iter()
                    .filter(|&&p| p != EMPTY && p >= lo && p < self.seq_len)
                    .count()
            }
        })
    }

    /// A deep copy: the fork and this cache then grow apart.
    pub fn fork(&self) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(LayerKv::deep_copy).transpose())
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            types: self.types.clone(),
            geometry: self.geometry.clone(),
            owns: self.owns.clone(),
            ring: self.ring.clone(),
            ..*self
        })
    }

    /// Forgets every position from `len` on. Full layers can always go back; sliding
    /// layers only while their ring still holds the `W − 1` positions before `len`
    /// (decoding keeps `W` slots plus the spare of [`Self::with_spare`]).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.seq_len {
            return Err(Error::invalid_argument(
                "truncate",
                format!("the cache holds {} positions, not {len}", self.seq_len),
            ));
        }
        let need = len.saturating_sub(self.window - 1)..len;
        let held = |p: usize| !self.ring.is_empty() && self.ring[p % self.ring.len()] == p;
        let ring_layers = self.types.contains(&LayerType::Sliding);
        if ring_layers && !need.clone().all(held) {
            return Err(Error::invalid_argument(
                "truncate",
                format!(
                    "the sliding-window ring no longer holds positions {}..{len} (it keeps {} slots; \
                     reserve spare slots to roll back further)",
                    need.start,
                    self.ring.len()
                ),
            ));
        }
        for p in self.ring.iter_mut().filter(|p| **p != EMPTY && **p >= len) {
            *p = EMPTY;
        }
        self.seq_len = len;
        Ok(())
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.ring.iter_mut().for_each(|p| *p = EMPTY);
        self.ring_used = 0;
        self.seq_len = 0;
        self.pending = 0;
    }

    fn grow_full(&mut self, tokens: usize) -> Result<()> {
        if tokens <= self.full_cap {
            return Ok(());
        }
        let cap = tokens.max(2 * self.full_cap).max(MIN_FULL_CAPACITY);
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let (Some(kv), LayerType::Full) = (l.as_ref(), self.types[i]) {
                *l = Some(kv.resized(cap, 0, self.seq_len, false)?);
            }
        }
        self.full_cap = cap;
        Ok(())
    }

    fn resize_ring(&mut self, cap: usize) -> Result<()> {
        let held: Vec<usize> = self.ring.iter().copied().filter(|&p| p != EMPTY).collect();
        let (lo, hi) = match (held.iter().min(), held.iter().max()) {
            (Some(&lo), Some(&hi)) => (lo.max((hi + 1).saturating_sub(cap)), hi + 1),
            _ => (0, 0),
        };
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let (Some(kv), LayerType::Sliding) = (l.as_ref(), self.types[i]) {
                *l = Some(kv.resized(cap, lo, hi, true)?);
            }
        }
        let old = self.ring.len();
        let mut ring = vec![EMPTY; cap];
        for p in lo..hi {
            if self.ring[p % old] == p {
                ring[p % cap] = p;
            }
        }
        self.ring_used = if hi > lo { cap.min(hi) } else { 0 };
        self.ring = ring;
        Ok(())
    }

    /// Makes room for a step of `s` tokens at positions `seq_len..seq_len + s`.
    pub(crate) fn begin_step(&mut self, s: usize) -> Result<()> {
        let end = self.seq_len + s;
        self.grow_full(end)?;
        if self.types.contains(&LayerType::Sliding) {
            // Never more slots than the positions so far need: a window longer than the
            // sequence (or a hostile config's window) costs nothing until it fills. The
            // ring doubles up to the window, so a growing sequence resizes it rarely.
            let full = self.window - 1 + s + self.spare;
            let need = (self.window - 1).min(self.seq_len) + s + self.spare;
            if self.ring.len() < need {
                self.resize_ring(need.max((2 * self.ring.len()).min(full)))?;
            }
            let cap = self.ring.len();
            for p in self.seq_len..end {
                self.ring[p % cap] = p;
            }
            self.ring_used = self.ring_used.max(end.min(cap));
        }
        self.pending = s;
        Ok(())
    }

    /// Ends the step begun with [`Self::begin_step`]. A ring grown for a prompt chunk
    /// goes back to what decoding needs, so between steps a sequence holds `W + spare`
    /// slots per sliding layer and a decode step attends over at most that many (one copy
    /// of the window per chunk, small beside the chunk's products).
    pub(crate) fn end_step(&mut self) -> Result<()> {
        self.seq_len += self.pending;
        self.pending = 0;
        let decode_cap = self.window + self.spare;
        if self.ring.len() > decode_cap {
            self.resize_ring(decode_cap)?;
        }
        Ok(())
    }

    /// Absolute positions of the keys a layer of type `t` attends over during the step
    /// (slot order; [`EMPTY`] for slots that hold nothing).
    pub(crate) fn key_positions(&self, t: LayerType) -> Vec<usize> {
        match t {
            LayerType::Full => (0..self.seq_len + self.pending).collect(),
            LayerType::Sliding => self.ring[..self.ring_used].to_vec(),
        }
    }

    /// Stores the step's keys and values `[K, s, D]` of layer `layer`.
    pub(crate) fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        if !self.owns.get(layer).copied().unwrap_or(false) {
            // Only reachable through a programming error: shared layers never write.
            return Err(candle_core::Error::Msg(format!("layer {layer} has no KV cache")).into());
        }
        let s = k.dim(1)?;
        if s != self.pending {
            return Err(candle_core::Error::Msg(format!(
                "layer {layer}: {s} keys written in a step of {} tokens",
                self.pending
            ))
            .into());
        }
        let (ring, cap) = match self.types[layer] {
            LayerType::Full => (false, self.full_cap),
            LayerType::Sliding => (true, self.ring.len()),
        };
        if self.layers[layer].is_none() {
            let (kh, d) = self.geometry[layer];
            self.layers[layer] = Some(LayerKv::zeros(kh, cap, d, k.dtype(), k.device())?);
        }
        let kv = self.layers[layer].as_ref().expect("allocated above");
        let mut off = 0;
        for (_, slot, n) in segments(self.seq_len, self.seq_len + s, cap, cap, ring) {
            kv.write(slot, &k.narrow(1, off, n)?, &v.narrow(1, off, n)?)?;
            off += n;
        }
        Ok(())
    }

    /// Keys and values `[K, n, D]` that layer `layer` stored for `positions`, in position
    /// order, between steps. Positions past [`Self::seq_len`] are not allowed; a sliding
    /// layer's must still be in its ring. An assistant drafter reads the target's K/V
    /// this way ([`crate::draft`]).
    pub(crate) fn gather(
        &self,
        layer: usize,
        positions: std::ops::Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let Some(Some(kv)) = self.layers.get(layer) else {
            return Err(candle_core::Error::Msg(format!("layer {layer} has no KV cache")).into());
        };
        if positions.end > self.seq_len || positions.is_empty() {
            return Err(candle_core::Error::Msg(format!(
                "layer {layer}: positions {positions:?} are not in a cache of {}",
                self.seq_len
            ))
            .into());
        }
        if self.types[layer] == LayerType::Full {
            let n = positions.len();
            return Ok((
                kv.k.narrow(1, positions.start, n)?,
                kv.v.narrow(1, positions.start, n)?,
            ));
        }
        let cap = self.ring.len();
        let slots = positions
            .map(|p| match self.ring[p % cap] == p {
                true => Ok((p % cap) as u32),
                false => Err(Error::invalid_argument(
                    "draft",
                    format!("the sliding-window ring no longer holds position {p}"),
                )),
            })
            .collect::<Result<Vec<u32>>>()?;
        let idx = Tensor::new(slots.as_slice(), kv.k.device())?;
        Ok((kv.k.index_select(&idx, 1)?, kv.v.index_select(&idx, 1)?))
    }

    /// The sliding-window length of the layers this cache serves.
    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// Keys and values `[K, T, D]` layer `layer` (the producer, for a KV-shared layer)
    /// attends over during the step, in the order of [`Self::key_positions`].
    pub(crate) fn view(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let Some(Some(kv)) = self.layers.get(layer) else {
            return Err(candle_core::Error::Msg(format!("layer {layer} has no KV cache")).into());
        };
        let t = match self.types[layer] {
            LayerType::Full => self.seq_len + self.pending,
            LayerType::Sliding => self.ring_used,
        };
        Ok((kv.k.narrow(1, 0, t)?, kv.v.narrow(1, 0, t)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn cfg() -> TextConfig {
        let v = serde_json::json!({"model_type": "gemma4_text", "num_hidden_layers": 3, "sliding_window": 4,
            "num_kv_shared_layers": 1, "layer_types": ["sliding_attention", "full_attention", "full_attention"],
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2, "global_head_dim": 2});
        ModelConfig::from_value(&v).unwrap().text
    }

    /// `[1, n, 2]` keys whose first element is the position.
    fn kv(n: usize, start: usize) -> Tensor {
        let data: Vec<f32> = (start..start + n).flat_map(|i| [i as f32, 0.0]).collect();
        Tensor::from_vec(data, (1, n, 2), &Device::Cpu).unwrap()
    }

    fn firsts(t: &Tensor) -> Vec<f32> {
        t.squeeze(0)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// One step of `n` tokens on layers 0 (sliding) and 1 (full); returns what layer 0
    /// attends over and its key positions.
    fn step(c: &mut KvCache, n: usize) -> (Vec<f32>, Vec<usize>) {
        let start = c.seq_len();
        c.begin_step(n).unwrap();
        c.write(0, &kv(n, start), &kv(n, start)).unwrap();
        c.write(1, &kv(n, start), &kv(n, start)).unwrap();
        let (k, _) = c.view(0).unwrap();
        let got = (firsts(&k), c.key_positions(LayerType::Sliding));
        let (kf, _) = c.view(1).unwrap();
        assert_eq!(
            firsts(&kf),
            (0..start + n).map(|p| p as f32).collect::<Vec<_>>()
        );
        c.end_step().unwrap();
        got
    }

    #[test]
    fn sliding_rings_hold_the_window_and_full_layers_everything() {
        let mut c = KvCache::new(&cfg());
        assert_eq!(c.cached_len(2), None, "shared layer owns no cache");
        // Prefill of 6: the ring holds W-1+6 = 9 slots, all six attended.
        let (k, pos) = step(&mut c, 6);
        assert_eq!(k, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(pos, [0, 1, 2, 3, 4, 5]);
        assert_eq!((c.cached_len(0), c.cached_len(1)), (Some(3), Some(6)));
        // Decode steps write one slot each, in place; each slot's key is its position.
        for _ in 0..5 {
            let (k, pos) = step(&mut c, 1);
            for (k, p) in k.iter().zip(&pos) {
                assert_eq!(*k, *p as f32);
            }
            let last = c.seq_len() - 1;
            assert!(pos.contains(&last) && (last - 3..last).all(|p| pos.contains(&p)));
        }
        assert_eq!(c.seq_len(), 11);
        assert_eq!(c.cached_len(0), Some(3));
        c.clear();
        assert_eq!((c.seq_len(), c.cached_len(0), c.bytes()), (0, Some(0), 0));
    }

    #[test]
    fn a_long_prefill_grows_the_ring_then_gives_it_back() {
        let mut c = KvCache::new(&cfg());
        step(&mut c, 40);
        // W + spare = 4 slots after the step, holding the last ones.
        assert_eq!(c.ring.len(), 4);
        let (k, pos) = step(&mut c, 1);
        assert_eq!(pos.iter().filter(|&&p| p != EMPTY).count(), 4);
        for (k, p) in k.iter().zip(&pos) {
            assert_eq!(*k, *p as f32);
        }
        // Full: 41 keys, capacity doubled at most once past the need.
        assert!(c.full_cap >= 41);
    }

    #[test]
    fn fork_is_independent_and_truncate_rolls_back() {
        let mut c = KvCache::new(&cfg()).with_spare(2);
        step(&mut c, 5);
        let mut f = c.fork().unwrap();
        step(&mut c, 1);
        step(&mut f, 1);
        step(&mut f, 1);
        assert_eq!((c.seq_len(), f.seq_len()), (6, 7));
        // Roll the fork back two tokens: the next step sees positions 2..=5 again.
        f.truncate(5).unwrap();
        let (k, pos) = step(&mut f, 1);
        let mut seen: Vec<usize> = pos.iter().copied().filter(|&p| p != EMPTY).collect();
        seen.sort_unstable();
        assert!(seen.ends_with(&[2, 3, 4, 5]));
        for (k, p) in k.iter().zip(&pos).filter(|(_, p)| **p != EMPTY) {
            assert_eq!(*k, *p as f32);
        }
        // The original was not touched by the fork's writes.
        let (k, _) = c.view(0).unwrap();
        let pos = c.key_positions(LayerType::Sliding);
        for (k, p) in firsts(&k).iter().zip(&pos).filter(|(_, p)| **p != EMPTY) {
            assert_eq!(*k, *p as f32);
        }
        // Too far back for the ring: an error naming the call.
        for _ in 0..6 {
            step(&mut c, 1);
        }
        let e = c.truncate(2).unwrap_err().to_string();
        assert!(e.contains("truncate") && e.contains("ring"), "{e}");
        assert!(c.truncate(99).is_err());
        assert!(c.bytes() > 0);
    }
}
