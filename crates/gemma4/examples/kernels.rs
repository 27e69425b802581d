//! Throughput of the projection kernels on E2B-sized matrices, for each weight format:
//! decode (one row, GB/s of weights streamed) and prefill (128 rows, GFLOP/s), through
//! `Linear::forward` and, for quantized weights, through candle's `QMatMul` directly.
//!
//! `cargo run --release -p gemma4 --example kernels [-- --threads N]`

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
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
    // Decode: one row, GB/s of weights streamed. Prefill: 128 rows, GFLOP/s.
    println!("format  path    decode GB/s  prefill GFLOP/s   (medians)");
    for (name, ls) in &formats {
        let bytes: usize = ls.iter().map(|l| l.weight().size_in_bytes()).sum();
        let flops: f64 = ls
            .iter()
            .map(|l| 2.0 * 128.0 * width(l) as f64 * rows(l) as f64)
            .sum();
        let paths: Vec<&str> = match ls[0].weight() {
            LinearWeight::Dense(_) => vec!["gemma4"],
            LinearWeight::Quantized(_) => vec!["gemma4", "candle"],
        };
        for path in paths {
            let run = |m: usize, passes: usize| -> anyhow::Result<f64> {
                let mut times = Vec::new();
                for _ in 0..passes + 1 {
                    let t = Instant::now();
                    for l in ls {
                        let x = Tensor::ones((1, m, width(l)), l.dtype(), &dev)?;
                        let y = match (path, l.weight()) {
                            ("candle", LinearWeight::Quantized(q)) => {
                                candle_core::quantized::QMatMul::QTensor(q.clone()).forward(&x)?
                            }
                            _ => l.forward(&x)?,
                        };
                        std::hint::black_box(y);
                    }
                    times.push(t.elapsed().as_secs_f64());
                }
                times.remove(0);
                times.sort_by(|a, b| a.total_cmp(b));
                Ok(times[times.len() / 2])
            };
            let decode = bytes as f64 / run(1, 31)? / 1e9;
            let prefill = flops / run(128, 3)? / 1e9;
            println!("{name:6}  {path:6}  {decode:11.1}  {prefill:15.1}");
        }
    }
    Ok(())
}

fn width(l: &Linear) -> usize {
    match l.weight() {
        LinearWeight::Dense(w) => w.dim(1).unwrap_or(0),
        LinearWeight::Quantized(q) => q.shape().dims()[1],
    }
}

fn rows(l: &Linear) -> usize {
    match l.weight() {
        LinearWeight::Dense(w) => w.dim(0).unwrap_or(0),
        LinearWeight::Quantized(q) => q.shape().dims()[0],
    }
}
