//! Throughput of the decode kernels on E2B-sized projections: GB/s of weights streamed
//! by one `Linear::forward` on a single row, median of several runs, for each format.
//!
//! `cargo run --release -p gemma4 --example kernels [-- --threads N]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use gemma4::linear::{Linear, LinearWeight};
use gemma4::quant::{quantize, QuantType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--threads N"))?
            .parse()?;
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    let dev = Device::Cpu;
    // Enough matrices that one pass is far larger than the caches (~1.2 GB of f32).
    let shapes = [(6144usize, 1536usize), (1536, 6144), (2048, 1536)];
    let copies = 24;
    let mut dense = Vec::new();
    for c in 0..copies {
        let (m, n) = shapes[c % shapes.len()];
        dense.push(Tensor::randn(0f32, 0.02, (m, n), &dev)?);
    }
    let formats: Vec<(String, Vec<Linear>)> = std::iter::once(("bf16".to_string(), None))
        .chain(
            QuantType::ALL
                .into_iter()
                .map(|q| (q.name().to_string(), Some(q))),
        )
        .map(|(name, q)| -> anyhow::Result<_> {
            let ls = dense
                .iter()
                .map(|w| -> anyhow::Result<Linear> {
                    Ok(match q {
                        None => Linear::from_weight(w.to_dtype(DType::BF16)?),
                        Some(q) => Linear::from_linear_weight(LinearWeight::Quantized(
                            std::sync::Arc::new(quantize(w, q)?),
                        )),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((name, ls))
        })
        .collect::<anyhow::Result<_>>()?;
    println!("format  GB/s (median of 31 passes over {copies} matrices)");
    for (name, ls) in &formats {
        let bytes: usize = ls.iter().map(|l| l.weight().size_in_bytes()).sum();
        let mut times = Vec::new();
        for _ in 0..32 {
            let t = Instant::now();
            for l in ls {
                let n = match l.weight() {
                    LinearWeight::Dense(w) => w.dim(1)?,
                    LinearWeight::Quantized(q) => q.shape().dims()[1],
                };
                let x = Tensor::ones((1, 1, n), l.dtype(), &dev)?;
                std::hint::black_box(l.forward(&x)?);
            }
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name:6}  {:.1}",
            bytes as f64 / times[times.len() / 2] / 1e9
        );
    }
    Ok(())
}
