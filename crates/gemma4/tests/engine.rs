//! The continuous-batching engine: requests submitted at once, more than run in
//! parallel, each get the tokens they get alone; a dropped receiver frees its slot; a full
//! queue refuses; log-probabilities are the model's.

mod common;

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use gemma4::generate::engine::{logprobs_of, Engine, EngineOptions, Event, Job, SubmitError};
use gemma4::generate::sampling::SamplingParams;
use gemma4::generate::{generate, GenerateOptions, StopReason};
use gemma4::text::model::PromptInput;
use gemma4::{Gemma4, LoadOptions};

use common::fixture;

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

fn model() -> Arc<Gemma4> {
    Arc::new(Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap())
}

fn start(m: &Arc<Gemma4>, parallel: usize, max_queue: usize, chunk: usize) -> Engine {
    Engine::start(
        m.clone(),
        |g: &Gemma4| &g.text,
        EngineOptions {
            parallel,
            max_queue,
            prefill_chunk: chunk,
            cache_bytes: 64 << 20,
        },
        None,
    )
}

fn job(ids: Vec<u32>, n: usize, top: Option<usize>) -> Job {
    Job {
        prompt: PromptInput::text(ids),
        options: opts(n),
        top_logprobs: top,
    }
}

/// The ids of a finished request, checking its events are in order.
fn collect(rx: Receiver<Event>) -> (Vec<u32>, StopReason) {
    let mut ids = Vec::new();
    for e in rx {
        match e {
            Event::Prefill { done, total } => assert!(ids.is_empty() && done < total),
            Event::Token { id, .. } => ids.push(id),
            Event::Finished {
                reason,
                generated_tokens,
                ..
            } => {
                assert_eq!(generated_tokens, ids.len());
                return (ids, reason);
            }
            Event::Failed(e) => panic!("{e}"),
        }
    }
    panic!("the engine dropped the request")
}

#[test]
fn queued_requests_get_what_they_get_alone() {
    let m = model();
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            (0..3 + 7 * i)
                .map(|t| 2 + ((t * 31 + i * 7) % 400) as u32)
                .collect()
        })
        .collect();
    let news = [6, 3, 9, 1, 5];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .zip(news)
        .map(|(p, n)| {
            generate(&m.text, p, &opts(n), |_| Ok(()))
                .unwrap()
                .generated_ids
        })
        .collect();
    // Two slots for five requests, prompts in chunks of 4: they queue, join and leave
    // at different steps.
    let engine = start(&m, 2, 8, 4);
    let rxs: Vec<_> = prompts
        .iter()
        .zip(news)
        .map(|(p, n)| engine.submit(job(p.clone(), n, None)).unwrap())
        .collect();
    for ((rx, want), n) in rxs.into_iter().zip(&alone).zip(news) {
        let (got, reason) = collect(rx);
        assert_eq!(&got, want);
        assert_eq!(got.len(), n);
        assert_eq!(reason, StopReason::MaxTokens);
    }
    // The engine updates its counters right after its last event.
    let t = std::time::Instant::now();
    while engine
        .stats()
        .running
        .load(std::sync::atomic::Ordering::SeqCst)
        != 0
    {
        assert!(
            t.elapsed().as_secs() < 5,
            "a sequence is still counted as running"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_dropped_receiver_frees_its_slot_and_a_full_queue_refuses() {
    let m = model();
    let engine = start(&m, 1, 1, 512);
    // A long generation, cancelled after its first token.
    let long = engine.submit(job(vec![2, 10, 11], 100_000, None)).unwrap();
    loop {
        if let Event::Token { .. } = long.recv().unwrap() {
            break;
        }
    }
    // The slot is busy: one request may wait, the next is refused.
    let waiting = engine.submit(job(vec![2, 12], 2, None)).unwrap();
    let mut refused = false;
    for _ in 0..50 {
        match engine.submit(job(vec![2, 13], 2, None)) {
            Err(SubmitError::QueueFull) => {
                refused = true;
                break;
            }
            Ok(rx) => drop(rx),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(refused);
    drop(long);
    // The waiting request runs to its end once the cancelled one is gone.
    let (ids, reason) = collect(waiting);
    assert_eq!((ids.len(), reason), (2, StopReason::MaxTokens));
}

#[test]
fn logprobs_are_the_models_log_softmax() {
    let m = model();
    let engine = start(&m, 2, 4, 512);
    let rx = engine.submit(job(vec![2, 40, 41, 42], 3, Some(5))).unwrap();
    let mut n = 0;
    for e in rx {
        match e {
            Event::Token { id, logprobs } => {
                let lp = logprobs.expect("asked for");
                assert_eq!(lp.top.len(), 5);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(lp.top[0].0, id);
                assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6);
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
                assert!(lp.logprob <= 0.0);
                n += 1;
            }
            Event::Finished { .. } => break,
            Event::Failed(e) => panic!("{e}"),
            Event::Prefill { .. } => {}
        }
    }
    assert_eq!(n, 3);
    let row = [1.0f32, 3.0, 2.0, -1.0];
    let lp = logprobs_of(&row, 2, 2);
    let z: f32 = row.iter().map(|x| x.exp()).sum();
    assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-6);
    assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
}

/// Steps `seq` to its end; the chosen ids and the logits of each.
fn finish(m: &Gemma4, mut seq: gemma4::Sequence) -> (Vec<u32>, Vec<Vec<f32>>, gemma4::Sequence) {
    let (mut ids, mut logits) = (Vec::new(), Vec::new());
    while !seq.is_finished() {
        let out = gemma4::step(&m.text, &mut [&mut seq], 3).unwrap();
        if let Some(o) = out.into_iter().next().flatten() {
            ids.extend(o.tokens);
            logits.extend(o.logits);
        }
    }
    (ids, logits, seq)
}

fn assert_same(a: &(Vec<u32>, Vec<Vec<f32>>), b: &(Vec<u32>, Vec<Vec<f32>>)) {
    assert_eq!(a.0, b.0);
    for (x, y) in a.1.iter().zip(&b.1) {
        assert!(common::max_abs(x, y) < common::TOL);
    }
}

#[test]
fn the_next_turn_reuses_the_cache_and_gets_what_a_fresh_prefill_gets() {
    use gemma4::Sequence;
    let m = model();
    let turn1: Vec<u32> = (0..9).map(|t| 2 + (t * 37 % 300) as u32).collect();
    let (gen1, _, prev) = finish(
        &m,
        Sequence::new(&m.text, PromptInput::text(turn1.clone()), &opts(4)).unwrap(),
    );
    // The next turn: the first turn, its answer, and more.
    let turn2: Vec<u32> = [turn1.clone(), gen1.clone(), vec![105, 40, 41, 42, 106, 107]].concat();
    let fresh = finish(
        &m,
        Sequence::new(&m.text, PromptInput::text(turn2.clone()), &opts(6)).unwrap(),
    );
    let cont =
        Sequence::continue_from(&m.text, PromptInput::text(turn2.clone()), &opts(6), prev).unwrap();
    // Everything the cache held is reused: the prompt and all but the last answer token.
    assert_eq!(cont.fed(), turn1.len() + gen1.len() - 1);
    let cont = finish(&m, cont);
    assert_same(&(fresh.0.clone(), fresh.1.clone()), &(cont.0, cont.1));
    // A prompt that departs early, after the sliding window (5) has moved on: the ring no
    // longer holds what the shorter prefix needs, so it is run from the start, correctly.
    let long: Vec<u32> = (0..40).map(|t| 2 + (t * 13 % 300) as u32).collect();
    let (_, _, prev) = finish(
        &m,
        Sequence::new(&m.text, PromptInput::text(long.clone()), &opts(3)).unwrap(),
    );
    let edited: Vec<u32> = [&long[..6], &[77, 78, 79][..]].concat();
    let fresh = finish(
        &m,
        Sequence::new(&m.text, PromptInput::text(edited.clone()), &opts(4)).unwrap(),
    );
    let cont = Sequence::continue_from(&m.text, PromptInput::text(edited), &opts(4), prev).unwrap();
    assert_eq!(cont.fed(), 0);
    let cont = finish(&m, cont);
    assert_same(&(fresh.0, fresh.1), &(cont.0, cont.1));
}

#[test]
fn a_new_image_behind_the_same_placeholders_is_not_taken_from_the_cache() {
    use gemma4::{Media, Prompt, Sequence};
    let m = Gemma4::load(&fixture("vision_small"), LoadOptions::default()).unwrap();
    let photo = m
        .load_image(&fixture("images").join("landscape.png"))
        .unwrap();
    // The same size, other pixels: the same placeholder ids, other embeddings.
    let mut negative = photo.clone();
    negative.data.iter_mut().for_each(|p| *p = 255 - *p);
    let prompt = Prompt::Text("<|image|> What is it?".into());
    let with = |img: &gemma4::vision::image_processor::RgbImage| {
        m.prepare(
            &prompt,
            &Media {
                images: vec![img.clone()],
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (a, b) = (with(&photo), with(&negative));
    assert_eq!(a.ids, b.ids);
    let (_, _, prev) = finish(&m, Sequence::new(&m.text, a.clone(), &opts(2)).unwrap());
    // The same image again: everything but the last prompt token is reused.
    let again = Sequence::continue_from(&m.text, a.clone(), &opts(2), prev).unwrap();
    assert_eq!(again.fed(), a.ids.len() - 1);
    let (_, _, prev) = finish(&m, again);
    // The other image: nothing from its first soft token on is reused (here nothing at
    // all: the sliding ring cannot roll back that far), and the answer is the one a
    // fresh prefill gives.
    let first_image = a
        .spans
        .as_ref()
        .unwrap()
        .iter()
        .position(|&s| s >= 0)
        .unwrap();
    assert_eq!(prev.shared_prefix(&m.text, &a).unwrap(), a.ids.len() - 1);
    assert_eq!(prev.shared_prefix(&m.text, &b).unwrap(), first_image);
    let cont = Sequence::continue_from(&m.text, b.clone(), &opts(3), prev).unwrap();
    assert!(cont.fed() <= first_image);
    let cont = finish(&m, cont);
    let fresh = finish(&m, Sequence::new(&m.text, b, &opts(3)).unwrap());
    assert_same(&(fresh.0, fresh.1), &(cont.0, cont.1));
}

#[test]
fn the_prefix_cache_serves_the_next_turn_and_a_shared_system_prompt() {
    use std::sync::atomic::Ordering;
    let m = model();
    let engine = start(&m, 2, 8, 512);
    let stats = engine.stats();
    let system: Vec<u32> = (0..40).map(|t| 2 + (t * 17 % 300) as u32).collect();
    let alone = |ids: &[u32], n: usize| {
        generate(&m.text, ids, &opts(n), |_| Ok(()))
            .unwrap()
            .generated_ids
    };
    let run = |ids: &[u32], n: usize| collect(engine.submit(job(ids.to_vec(), n, None)).unwrap()).0;
    // Turn one, then turn two built on its answer: the second starts from the first's cache.
    let turn1 = [system.clone(), vec![40, 41]].concat();
    let gen1 = run(&turn1, 4);
    assert_eq!(gen1, alone(&turn1, 4));
    let turn2 = [turn1.clone(), gen1.clone(), vec![42, 43, 44]].concat();
    assert_eq!(run(&turn2, 5), alone(&turn2, 5));
    assert_eq!(stats.prefix_cache_hits.load(Ordering::Relaxed), 1);
    assert_eq!(
        stats.prefix_cache_tokens.load(Ordering::Relaxed),
        (turn1.len() + gen1.len() - 1) as u64
    );
    // Another conversation with the same system prompt branches from it, and the kept
    // conversation still serves its own next turn.
    let other = [system.clone(), vec![90, 91, 92]].concat();
    assert_eq!(run(&other, 3), alone(&other, 3));
    assert_eq!(stats.prefix_cache_hits.load(Ordering::Relaxed), 2);
    assert!(stats.prefix_cache_bytes.load(Ordering::Relaxed) > 0);
    // A prompt sharing only a few tokens with the kept ones is prefilled afresh: copying
    // a kept cache would cost more than it spares.
    let short = [system[..5].to_vec(), vec![93, 94, 95]].concat();
    assert_eq!(run(&short, 3), alone(&short, 3));
    assert_eq!(stats.prefix_cache_hits.load(Ordering::Relaxed), 2);
}
