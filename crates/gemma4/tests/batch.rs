//! Many sequences at once: a sequence run inside a batch gets what it gets alone, on
//! every fixture. Batches mix prompt lengths, prefill chunks and decode steps in the same
//! forward pass, sequences join late and leave early, and on the multimodal fixtures
//! some sequences carry images, video or audio. Every step's logits are held to 1e-4
//! max-abs of the sequence run alone, and the greedy ids must be identical.

mod common;

use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::sequence::{step, Sequence};
use gemma4::generate::GenerateOptions;
use gemma4::model::Media;
use gemma4::text::model::{LogitsFor, PromptInput, StepInput, TextModel};
use gemma4::vision::image_processor::load_image;
use gemma4::vision::video::load_video;
use gemma4::{Gemma4, LoadOptions, Prompt};

use common::{fixture, ids, json, max_abs, rows, TOL};

/// Tokens chosen and the logits each was chosen from.
#[derive(Default, Debug)]
struct Trace {
    ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn opts(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: Default::default(),
        constraint: None,
        draft: None,
    }
}

/// How a batch is run: prompt tokens per step, and how many steps apart the sequences
/// join (sequence `i` joins at step `i · stagger`).
#[derive(Debug, Clone, Copy)]
struct Schedule {
    chunk: usize,
    stagger: usize,
}

fn run(tm: &TextModel, inputs: &[PromptInput], news: &[usize], s: Schedule) -> Vec<Trace> {
    let mut seqs: Vec<Sequence> = inputs
        .iter()
        .zip(news)
        .map(|(p, &n)| Sequence::new(tm, p.clone(), &opts(n)).unwrap())
        .collect();
    let mut traces: Vec<Trace> = inputs.iter().map(|_| Trace::default()).collect();
    let mut t = 0;
    while seqs.iter().any(|s| !s.is_finished()) {
        let joined = (t / s.stagger.max(1) + 1).min(seqs.len());
        let joined = if s.stagger == 0 { seqs.len() } else { joined };
        let mut batch: Vec<&mut Sequence> = seqs.iter_mut().take(joined).collect();
        let out = step(tm, &mut batch, s.chunk).unwrap();
        for (i, o) in out.into_iter().enumerate() {
            if let Some(o) = o {
                traces[i].ids.extend(o.tokens);
                traces[i].logits.extend(o.logits);
            }
        }
        t += 1;
        assert!(t < 10_000, "the batch does not finish");
    }
    traces
}

fn check(name: &str, tm: &TextModel, inputs: &[PromptInput]) {
    // Different lengths of generation, so sequences leave the batch at different steps.
    let news: Vec<usize> = (0..inputs.len()).map(|i| 4 + 2 * (i % 3)).collect();
    let alone: Vec<Trace> = inputs
        .iter()
        .zip(&news)
        .map(|(p, &n)| {
            let one = Schedule {
                chunk: usize::MAX,
                stagger: 0,
            };
            run(tm, std::slice::from_ref(p), &[n], one).pop().unwrap()
        })
        .collect();
    for schedule in [
        Schedule {
            chunk: usize::MAX,
            stagger: 0,
        },
        Schedule {
            chunk: 3,
            stagger: 1,
        },
        Schedule {
            chunk: 7,
            stagger: 3,
        },
    ] {
        let batched = run(tm, inputs, &news, schedule);
        for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
            assert_eq!(b.ids, a.ids, "{name} {schedule:?} sequence {i}: greedy ids");
            for (k, (x, y)) in b.logits.iter().zip(&a.logits).enumerate() {
                let d = max_abs(x, y);
                assert!(
                    d <= TOL,
                    "{name} {schedule:?} sequence {i} step {k}: logits differ by {d}"
                );
            }
        }
    }
}

fn text_inputs(name: &str) -> (Gemma4, Vec<PromptInput>) {
    let dir = fixture(name);
    let g = json(&dir.join("golden/prompts.json"));
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let inputs = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| PromptInput::text(ids(&c["prompt_ids"])))
        .collect();
    (model, inputs)
}

fn check_text(name: &str) {
    let (model, inputs) = text_inputs(name);
    check(name, &model.text, &inputs);
}

/// The multimodal fixtures' prompts (text with images, a video, audio clips, or none),
/// prepared as the CLI does.
fn check_media(name: &str) {
    let dir = fixture(name);
    let g = json(&dir.join("golden/prompts.json"));
    let model = Gemma4::load(&dir, LoadOptions::default()).unwrap();
    let images = fixture("images");
    let inputs: Vec<PromptInput> = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let list = |key: &str| -> Vec<String> {
                case[key]
                    .as_array()
                    .map(|a| a.iter().map(|f| f.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default()
            };
            let media = Media {
                images: list("images")
                    .iter()
                    .map(|f| load_image(&images.join(f)).unwrap())
                    .collect(),
                videos: case["video"]
                    .as_str()
                    .map(|f| {
                        vec![
                            load_video(&images.join(f), usize::MAX, &gemma4::Limits::DEFAULT)
                                .unwrap(),
                        ]
                    })
                    .unwrap_or_default(),
                audio: list("audio")
                    .iter()
                    .map(|f| gemma4::audio::decode::load_audio(&fixture("audio").join(f)).unwrap())
                    .collect(),
            };
            let text = case["text"].as_str().unwrap().to_string();
            model.prepare(&Prompt::Text(text), &media).unwrap()
        })
        .collect();
    assert!(
        inputs.iter().any(|p| p.embeds.is_some()) && inputs.len() > 1,
        "{name}: the batch mixes prompts with and without media"
    );
    check(name, &model.text, &inputs);
}

#[test]
fn e2b_like_batched_equals_alone() {
    check_text("e2b_like");
}

#[test]
fn dense_keqv_batched_equals_alone() {
    check_text("dense_keqv");
}

#[test]
fn moe_batched_equals_alone() {
    check_text("moe");
}

#[test]
fn text_only_batched_equals_alone() {
    check_text("text_only");
}

#[test]
fn kquant_batched_equals_alone() {
    check_text("kquant");
}

#[test]
fn unified_batched_equals_alone() {
    check_text("unified");
}

#[test]
fn vision_small_batched_equals_alone() {
    check_media("vision_small");
}

#[test]
fn vision_large_bidirectional_batched_equals_alone() {
    check_media("vision_large");
}

#[test]
fn vision_unified_batched_equals_alone() {
    check_media("vision_unified");
}

#[test]
fn audio_small_batched_equals_alone() {
    check_media("audio_small");
}

#[test]
fn audio_unified_batched_equals_alone() {
    check_media("audio_unified");
}

/// One forward pass where one sequence wants every row's logits and another only its
/// last: each equals its own forward alone.
#[test]
fn forward_batch_mixes_all_and_last_logits() {
    let (model, inputs) = text_inputs("e2b_like");
    let tm = &model.text;
    let (a, b) = (&inputs[0].ids, &inputs[1].ids);
    let (mut ca, mut cb) = (tm.new_cache(), tm.new_cache());
    let mut batch = [
        StepInput {
            embeds: tm.embed(a).unwrap(),
            ple_ids: a,
            spans: None,
            cache: &mut ca,
            which: LogitsFor::All,
        },
        StepInput {
            embeds: tm.embed(b).unwrap(),
            ple_ids: b,
            spans: None,
            cache: &mut cb,
            which: LogitsFor::Last,
        },
    ];
    let out = tm.forward_batch(&mut batch).unwrap();
    let want_a = tm.forward(a, &mut tm.new_cache(), LogitsFor::All).unwrap();
    let want_b = tm.forward(b, &mut tm.new_cache(), LogitsFor::Last).unwrap();
    let (got_a, got_b) = (out[0].as_ref().unwrap(), out[1].as_ref().unwrap());
    assert_eq!(got_a.dims(), want_a.dims());
    assert_eq!(got_b.dims(), want_b.dims());
    assert!(max_abs(&rows(got_a), &rows(&want_a)) <= TOL);
    assert!(max_abs(&rows(got_b), &rows(&want_b)) <= TOL);
    assert_eq!((ca.seq_len(), cb.seq_len()), (a.len(), b.len()));
}

/// A forked cache continues like the original; a truncated one recomputes the dropped
/// token to the same logits.
#[test]
fn fork_and_truncate_continue_exactly() {
    let (model, inputs) = text_inputs("e2b_like");
    let tm = &model.text;
    let p = &inputs[0].ids;
    let mut cache = tm.new_cache().with_spare(2);
    tm.forward(p, &mut cache, LogitsFor::Last).unwrap();
    let mut fork = cache.fork().unwrap();
    let a = rows(&tm.forward(&[5], &mut cache, LogitsFor::Last).unwrap());
    let b = rows(&tm.forward(&[5], &mut fork, LogitsFor::Last).unwrap());
    assert_eq!(a, b, "a fork continues like the original");
    // Two more tokens on the fork, then back to where both stood.
    tm.forward(&[6], &mut fork, LogitsFor::Last).unwrap();
    tm.forward(&[7], &mut fork, LogitsFor::Last).unwrap();
    fork.truncate(p.len() + 1).unwrap();
    let again = rows(&tm.forward(&[6], &mut fork, LogitsFor::Last).unwrap());
    let once = rows(&tm.forward(&[6], &mut cache, LogitsFor::Last).unwrap());
    assert!(max_abs(&again, &once) <= TOL);
    assert!(cache.bytes() > 0 && cache.bytes() == fork.bytes());
}
