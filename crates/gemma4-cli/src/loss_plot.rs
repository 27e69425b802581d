//! The loss curve of a fine-tuning run as a PNG (`OUT/loss.png`), drawn from its JSONL log
//! with plotters into an RGB buffer and encoded with `image`: the training loss per step,
//! the eval loss where it was measured.
//!
//! The log is appended to across `--resume`s, so the curve covers the whole run. A step
//! logged twice (a run stopped after its last checkpoint, then resumed from it) is drawn
//! with its last value, the one the resumed run computed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

const SIZE: (u32, u32) = (900, 520);

/// The curves of a log: step → training loss, step → eval loss.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Curves {
    pub(crate) train: BTreeMap<u64, f64>,
    pub(crate) eval: BTreeMap<u64, f64>,
}

/// Reads the points of `log` (lines the trainer wrote; others are skipped).
pub(crate) fn read_log(log: &Path) -> Result<Curves> {
    let text = std::fs::read_to_string(log).with_context(|| log.display().to_string())?;
    let mut c = Curves::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_u64() else {
            continue;
        };
        let finite = |k: &str| v[k].as_f64().filter(|x| x.is_finite());
        if let Some(l) = finite("loss") {
            c.train.insert(step, l);
        }
        if let Some(l) = finite("eval_loss") {
            c.eval.insert(step, l);
        }
    }
    Ok(c)
}

/// Plotters draws text only with a registered font: DejaVu Sans, embedded (no system
/// font is needed).
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; a failure would only lose the labels.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the loss curve: {e}")
}

/// Draws `curves` into an RGB buffer of [`SIZE`].
fn render(curves: &Curves) -> Result<Vec<u8>> {
    register_font();
    let (w, h) = SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let all = curves.train.iter().chain(&curves.eval);
        let (mut x0, mut x1) = (u64::MAX, 0u64);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for (&s, &l) in all {
            x0 = x0.min(s);
            x1 = x1.max(s);
            y0 = y0.min(l);
            y1 = y1.max(l);
        }
        // A single step or a flat curve still gets an axis with some extent.
        let x1 = x1.max(x0 + 1);
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        let (y0, y1) = ((y0 - pad).max(0.0), y1 + pad);
        let mut chart = ChartBuilder::on(&root)
            .caption("Fine-tuning loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        if !curves.train.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    curves.train.iter().map(|(&s, &l)| (s, l)),
                    BLUE.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label("training")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        }
        if !curves.eval.is_empty() {
            let red = RED.stroke_width(2);
            chart
                .draw_series(LineSeries::new(
                    curves.eval.iter().map(|(&s, &l)| (s, l)),
                    red,
                ))
                .map_err(plot_err)?
                .label("eval")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
            chart
                .draw_series(
                    curves
                        .eval
                        .iter()
                        .map(|(&s, &l)| Circle::new((s, l), 4, RED.filled())),
                )
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(buf)
}

/// Draws the curves of `log` to `png` (through a temporary file and a rename). A log with
/// no loss in it draws nothing and returns `false`.
pub(crate) fn write_loss_plot(log: &Path, png: &Path) -> Result<bool> {
    let curves = read_log(log)?;
    if curves.train.is_empty() && curves.eval.is_empty() {
        return Ok(false);
    }
    let rgb = render(&curves)?;
    let (w, h) = SIZE;
    let img = image::RgbImage::from_raw(w, h, rgb).context("loss curve buffer")?;
    let tmp = png.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, png).with_context(|| png.display().to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_gives_one_point_per_step_the_last_written() {
        let dir = std::env::temp_dir().join(format!("gemma4-loss-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("train_log.jsonl");
        std::fs::write(
            &log,
            concat!(
                "{\"step\":1,\"loss\":3.0,\"lr\":0.1}\n",
                "{\"step\":2,\"loss\":2.5}\n",
                "{\"step\":2,\"eval_loss\":2.7}\n",
                "not json\n",
                "{\"step\":2,\"loss\":2.4}\n",
                "{\"step\":3,\"loss\":null}\n",
            ),
        )
        .unwrap();
        let c = read_log(&log).unwrap();
        assert_eq!(c.train, BTreeMap::from([(1, 3.0), (2, 2.4)]));
        assert_eq!(c.eval, BTreeMap::from([(2, 2.7)]));

        let png = dir.join("loss.png");
        assert!(write_loss_plot(&log, &png).unwrap());
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SIZE);
        // The curve and the labels are drawn: blue pixels and dark (text) pixels.
        let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| img.pixels().filter(|p| f(p)).count();
        assert!(count(&|p| p[2] > 200 && p[0] < 80 && p[1] < 80) > 50);
        assert!(count(&|p| p[0] < 60 && p[1] < 60 && p[2] < 60) > 500);

        // A log without losses draws nothing.
        std::fs::write(&log, "{\"step\":1}\n").unwrap();
        let empty = dir.join("none.png");
        assert!(!write_loss_plot(&log, &empty).unwrap());
        assert!(!empty.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
