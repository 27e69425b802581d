//! The fine-tuning loop: epochs over the examples in a seeded order, gradient
//! accumulation over `batch` examples per optimizer step (the loss normalised by the
//! supervised tokens of the whole step, as transformers' `num_items_in_batch`), global-norm
//! clipping, the learning-rate schedule, AdamW, evaluation, and resumable checkpoints.
//!
//! A checkpoint (`OUT/checkpoint/`) holds the adapter in peft's files, the optimizer's
//! moments (`optimizer.safetensors`) and `trainer_state.json` (step, data cursor, the
//! settings that must not change on resume, the base model's shape). It is written to a
//! temporary directory that then replaces the previous one, so an interrupted save leaves
//! the last complete checkpoint. Resuming continues exactly: the data order is a function
//! of the seed and the epoch, and LoRA dropout's masks of the seed, the step and the
//! sequence's place in it (no random state runs on), so N steps in one run equal N/2,
//! stop, resume, N/2.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{Error, Result};
use crate::lora::{AdapterSet, LoraAdapter};
use crate::model::Gemma4;
use crate::nn::lora::Dropout;
use crate::train::adamw::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::adapter::{write_f32_safetensors, LoraSpec, TrainableAdapter};
use crate::train::gradients::{
    media_sequence_gradients, media_sequence_loss, Example, GradientOptions,
};
use crate::train::schedule::{Decay, Schedule};

/// Everything that decides a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<String>,
    pub lr: f64,
    pub decay: String,
    pub warmup_steps: u64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: the epochs' worth).
    pub max_steps: Option<u64>,
    /// Examples per optimizer step (gradient accumulation).
    pub batch: usize,
    pub clip: Option<f64>,
    pub weight_decay: f64,
    pub seed: u64,
    pub recompute: bool,
    /// LoRA dropout (peft's `lora_dropout`); checkpoints written before it existed had 0.
    #[serde(default)]
    pub dropout: f64,
    /// Pack each step's examples into sequences of at most this many tokens
    /// ([`Example::pack`]): the same gradients, in fewer and larger products.
    #[serde(default)]
    pub pack: Option<usize>,
    /// Encoders adapted too (`vision`, `audio`); their examples keep their media, encoded again at
    /// every step.
    #[serde(default)]
    pub towers: Vec<String>,
}

impl TrainConfig {
    fn decay(&self) -> Result<Decay> {
        match self.decay.as_str() {
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            "constant" => Ok(Decay::Constant),
            other => Err(Error::invalid_argument(
                "schedule",
                format!("`{other}`: linear, cosine or constant"),
            )),
        }
    }

    /// The settings a resumed run may not change (all of them but the step limit).
    fn same_run(&self, other: &TrainConfig) -> bool {
        TrainConfig {
            max_steps: None,
            epochs: 0,
            ..self.clone()
        } == TrainConfig {
            max_steps: None,
            epochs: 0,
            ..other.clone()
        }
    }
}

/// One optimizer step's numbers (a line of the JSONL log).
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: u64,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Where the loop is in the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: usize,
    /// Examples of this epoch already used.
    pub index: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    cursor: Cursor,
    config: TrainConfig,
    /// The base model's shape, so a checkpoint is not resumed on another model.
    model: serde_json::Value,
}

fn model_signature(model: &Gemma4) -> serde_json::Value {
    let t = &model.config.text;
    json!({
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "vocab_size": t.vocab_size,
        "intermediate_size": t.intermediate_size,
    })
}

/// `examples` in order, grouped greedily into runs of at most `max` tokens (an example
/// longer than `max` runs alone).
fn packs<'a>(examples: &[&'a Example], max: usize) -> Vec<Vec<&'a Example>> {
    let mut out: Vec<Vec<&Example>> = Vec::new();
    let mut len = 0;
    for &ex in examples {
        match out.last_mut() {
            Some(run) if len + ex.ids.len() <= max => run.push(ex),
            _ => {
                out.push(vec![ex]);
                len = 0;
            }
        }
        len += ex.ids.len();
    }
    out
}

/// The seed of the dropout masks of the `j`-th sequence of optimizer step `step`
/// (splitmix64's finaliser over the three, so nearby steps draw unrelated masks).
fn mask_seed(seed: u64, step: u64, j: usize) -> u64 {
    let mut z = seed
        .wrapping_add(step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((j as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The loop's state.
pub struct Trainer {
    pub config: TrainConfig,
    pub adapter: TrainableAdapter,
    set: AdapterSet,
    vars: Vec<Var>,
    opt: AdamW,
    pub step: u64,
    pub cursor: Cursor,
    schedule: Schedule,
    total_steps: u64,
}

impl Trainer {
    /// A new run on `model` (the adapter is attached to it as `name`), or, with `resume`,
    /// the run saved in that checkpoint directory.
    pub fn new(
        model: &mut Gemma4,
        config: TrainConfig,
        examples: usize,
        resume: Option<&Path>,
    ) -> Result<Self> {
        if config.batch == 0 || config.r == 0 || examples == 0 {
            return Err(Error::invalid_argument(
                "batch",
                "the batch, the rank and the data must not be empty",
            ));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::invalid_argument(
                "dropout",
                format!("{} is not a probability below 1", config.dropout),
            ));
        }
        // peft refuses dropout on parameter adapters: an input mask cannot be factored out
        // of the expert's product with its weight plus update.
        if config.dropout > 0.0
            && config
                .targets
                .iter()
                .any(|t| t == "experts" || t.starts_with("experts."))
        {
            return Err(Error::invalid_argument(
                "dropout",
                "LoRA dropout does not apply to the MoE experts' adapters (peft refuses it too)",
            ));
        }
        let steps_per_epoch = examples.div_ceil(config.batch) as u64;
        let total_steps = config
            .max_steps
            .unwrap_or(steps_per_epoch * config.epochs as u64);
        let schedule = Schedule {
            lr: config.lr,
            warmup: config.warmup_steps,
            total: total_steps,
            decay: config.decay()?,
        };
        let adamw = AdamWConfig {
            weight_decay: config.weight_decay,
            ..Default::default()
        };
        let (adapter, opt, step, cursor) = match resume {
            None => {
                let spec = LoraSpec {
                    r: config.r,
                    alpha: config.alpha,
                    use_rslora: config.use_rslora,
                    targets: config.targets.clone(),
                    towers: config.towers.clone(),
                };
                let mut adapter = TrainableAdapter::for_model(model, &spec, config.seed)?;
                adapter.config.lora_dropout = config.dropout;
                let opt = AdamW::new(&adapter.vars(), adamw);
                (adapter, opt, 0, Cursor { epoch: 0, index: 0 })
            }
            Some(dir) => {
                let path = dir.join("trainer_state.json");
                let state: TrainerState = serde_json::from_value(crate::error::read_json(&path)?)
                    .map_err(|e| Error::config(&path, e.to_string()))?;
                if state.model != model_signature(model) {
                    return Err(Error::config(
                        &path,
                        format!(
                            "the checkpoint is of another model ({}, this one is {})",
                            state.model,
                            model_signature(model)
                        ),
                    ));
                }
                if !state.config.same_run(&config) {
                    return Err(Error::config(
                        &path,
                        "the checkpoint's settings differ from this run's (only the number of \
                         steps or epochs may change on resume)",
                    ));
                }
                let adapter = TrainableAdapter::from_adapter(&LoraAdapter::load(dir)?)?;
                let vars = adapter.vars();
                let moments = candle_core::safetensors::load(
                    dir.join("optimizer.safetensors"),
                    &candle_core::Device::Cpu,
                )?;
                let state_tensors = (0..2 * vars.len())
                    .map(|i| {
                        moments.get(&format!("{i}")).cloned().ok_or_else(|| {
                            Error::config(
                                dir.join("optimizer.safetensors"),
                                format!("moment {i} is missing"),
                            )
                        })
                    })
                    .collect::<Result<Vec<Tensor>>>()?;
                let opt = AdamW::restore(&vars, adamw, state.step, &state_tensors)?;
                (adapter, opt, state.step, state.cursor)
            }
        };
        let set = model.attach_adapter(&adapter.as_adapter("training"))?.set();
        let vars = adapter.vars();
        Ok(Trainer {
            config,
            adapter,
            set,
            vars,
            opt,
            step,
            cursor,
            schedule,
            total_steps,
        })
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps
    }

    /// The order of epoch `epoch`'s examples.
    fn order(&self, epoch: usize, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        idx.shuffle(&mut rng);
        idx
    }

    /// One optimizer step over the next `batch` examples.
    pub fn train_step(&mut self, model: &Gemma4, examples: &[Example]) -> Result<StepLog> {
        let t = Instant::now();
        let n = examples.len();
        if self.cursor.index >= n {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
        }
        let order = self.order(self.cursor.epoch, n);
        let end = (self.cursor.index + self.config.batch).min(n);
        let picked: Vec<&Example> = order[self.cursor.index..end]
            .iter()
            .map(|&i| &examples[i])
            .collect();
        if !self.config.towers.is_empty() {
            if let Some(ex) = picked
                .iter()
                .find(|e| e.media.is_some() && e.sources.is_empty())
            {
                return Err(Error::invalid_argument(
                    "towers",
                    format!(
                        "an example of {} tokens has media but did not keep them: read the data \
                         with `load_jsonl_with(.., keep_sources: true)` to train the encoders",
                        ex.ids.len()
                    ),
                ));
            }
        }
        let norm = picked.iter().map(|e| e.supervised()).sum::<usize>().max(1) as f64;
        let mut acc: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        let runs: Vec<Example> = match self.config.pack {
            Some(max) => packs(&picked, max)
                .iter()
                .map(|p| Example::pack(p))
                .collect::<Result<_>>()?,
            None => picked.iter().map(|&e| e.clone()).collect(),
        };
        for (j, ex) in runs.iter().enumerate() {
            let opts = GradientOptions {
                recompute: self.config.recompute,
                dropout: Some(Dropout {
                    p: self.config.dropout,
                    seed: mask_seed(self.config.seed, self.step, j),
                }),
                ..Default::default()
            };
            let out =
                media_sequence_gradients(model, self.set, &self.vars, ex, norm, opts, &mut acc)?;
            loss_sum += out.loss_sum;
            tokens += ex.ids.len();
        }
        let grad_norm = match self.config.clip {
            Some(max) => clip_grad_norm(&mut acc, max)?,
            None => clip_grad_norm(&mut acc, f64::INFINITY)?,
        };
        let lr = self.schedule.lr_at(self.step);
        self.opt.step(&self.vars, &acc, lr)?;
        self.step += 1;
        self.cursor.index = end;
        let secs = t.elapsed().as_secs_f64();
        Ok(StepLog {
            step: self.step,
            epoch: self.cursor.epoch,
            loss: loss_sum / norm,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            elapsed_s: secs,
        })
    }

    /// Mean loss per supervised token over `examples`, with the adapter as it is now
    /// (forward only).
    pub fn eval_loss(&self, model: &Gemma4, examples: &[Example]) -> Result<f64> {
        let (mut sum, mut n) = (0.0, 0);
        for ex in examples {
            let (s, k) =
                media_sequence_loss(model, self.set, ex, GradientOptions::default().vocab_block)?;
            sum += s;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }

    /// Writes the adapter alone (peft's files) to `dir`.
    pub fn save_adapter(&self, dir: &Path, base: &str) -> Result<()> {
        self.adapter.save(dir, Some(base))
    }

    /// Writes a resumable checkpoint to `out/checkpoint`, replacing the previous one only
    /// once the new one is complete.
    pub fn save_checkpoint(&self, model: &Gemma4, out: &Path, base: &str) -> Result<PathBuf> {
        let dir = out.join("checkpoint");
        let tmp = out.join(format!("checkpoint.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.adapter.save(&tmp, Some(base))?;
        let moments: Vec<(String, Tensor)> = self
            .opt
            .state(&self.vars)?
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("{i}"), t))
            .collect();
        write_f32_safetensors(&tmp.join("optimizer.safetensors"), &moments)?;
        let state = TrainerState {
            step: self.step,
            cursor: self.cursor,
            config: self.config.clone(),
            model: model_signature(model),
        };
        let text =
            serde_json::to_string_pretty(&state).map_err(|e| Error::config(&tmp, e.to_string()))?;
        crate::loading::atomic::write_atomic(&tmp.join("trainer_state.json"), text.as_bytes())?;
        let old = out.join(format!("checkpoint.old{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(dir)
    }
}
