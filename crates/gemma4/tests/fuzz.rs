//! A seeded mutation fuzzer over every parser that takes a user's file (issue 19): GGUF and
//! safetensors checkpoints, config, processor and tokenizer JSON, chat templates, images,
//! GIF videos, audio, and assistant drafters (their config, weights and llama.cpp file,
//! loaded against their target and drafting). Each case mutates a fixture (bit flips, random bytes, integers at
//! their edges, cut, repeated or removed spans; for JSON, half the cases keep it JSON and
//! swap values for extreme or ill-typed ones or remove them, so validation is reached),
//! then runs it in a child process (this test binary again) limited to 4 GiB of address
//! space and a time limit, and sorts the outcome: a result or a clean error is fine; a
//! panic, a crash, a timeout, an allocation failure or a message with a raw control
//! character is a failure, reported with the seed that reproduces it.
//!
//! CI runs `fuzz_briefly` (a few hundred cases); `scripts/fuzz.sh N` runs N cases and
//! prints the counts by outcome and kind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;

const KINDS: [&str; 10] = [
    "gguf",
    "safetensors",
    "config",
    "processor",
    "tokenizer",
    "template",
    "image",
    "video",
    "audio",
    "drafter",
];

/// xorshift64*: the whole case follows from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The fixture files a kind mutates.
fn seeds(kind: &str) -> Vec<PathBuf> {
    let f = |d: &str, n: &str| fixture(d).join(n);
    match kind {
        "gguf" => vec![
            f("llamacpp", "e2b_like-bf16.gguf"),
            f("llamacpp", "moe-bf16.gguf"),
        ],
        "safetensors" => vec![f("text_only", "model.safetensors")],
        "config" => vec![
            f("text_only", "config.json"),
            f("audio_small", "config.json"),
        ],
        "processor" => vec![f("audio_small", "processor_config.json")],
        "tokenizer" => vec![f("text_only", "tokenizer.json")],
        "template" => vec![f("text_only", "chat_template.jinja")],
        "image" => [
            "tiny.png",
            "alpha.png",
            "portrait.jpg",
            "icon.bmp",
            "palette.gif",
            "photo.webp",
        ]
        .iter()
        .map(|n| f("images", n))
        .collect(),
        "video" => vec![f("images", "clip.gif")],
        "audio" => [
            "hello_16k.wav",
            "numbers_8k_u8.wav",
            "speech_16k.ogg",
            "speech_24k.mp3",
            "speech_48k.flac",
        ]
        .iter()
        .map(|n| f("audio", n))
        .collect(),
        "drafter" => vec![
            f("drafters/e2b_like", "config.json"),
            f("drafters/e2b_like", "generation_config.json"),
            f("drafters/e2b_like", "model.safetensors"),
            f("llamacpp", "drafter-dense_keqv-f32.gguf"),
        ],
        _ => unreachable!("kind {kind}"),
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7F,
    0xFF,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    0x1_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF,
    u64::MAX,
    1 << 40,
];
const JSON_NUMBERS: [&str; 8] = [
    "0",
    "-1",
    "1e308",
    "4294967296",
    "1e999",
    "0.0",
    "1099511627776",
    "-0",
];

/// Where a media file's structure lies beyond its header: JPEG/MP3 markers (0xFF and a
/// non-zero, non-0xFF byte) and four-letter chunk and page tags (PNG chunks, RIFF, Ogg).
fn markers(b: &[u8]) -> Vec<usize> {
    (0..b.len().saturating_sub(4))
        .filter(|&i| {
            (b[i] == 0xFF && !matches!(b[i + 1], 0 | 0xFF))
                || b[i..i + 4].iter().all(u8::is_ascii_alphabetic)
        })
        .collect()
}

/// `bytes` after 1–4 mutations; `focus` bytes at the front (a header) get most of them,
/// and with `deep`, the bytes around the file's later structure ([`markers`]) many others.
fn mutate(mut b: Vec<u8>, rng: &mut Rng, focus: usize, json: bool, deep: bool) -> Vec<u8> {
    let marks = if deep { markers(&b) } else { Vec::new() };
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(0);
        }
        let roll = rng.below(10);
        let at = if roll < 4 && !marks.is_empty() {
            // Within 16 bytes after a marker: its length, type or first fields.
            (marks[rng.below(marks.len())] + rng.below(16)).min(b.len() - 1)
        } else if roll < 8 {
            rng.below(focus.clamp(1, b.len()))
        } else {
            rng.below(b.len())
        };
        match rng.below(if json { 8 } else { 7 }) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)].min(b.len() - at);
                b[at..at + w].copy_from_slice(&v[..w]);
            }
            3 => {
                let n = (1 + rng.below(64)).min(b.len() - at);
                b.drain(at..at + n);
            }
            4 => {
                let n = (1 + rng.below(256)).min(b.len() - at);
                let piece = b[at..at + n].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, piece);
            }
            5 => b.truncate(at),
            6 => {
                let n = (1 + rng.below(16)).min(b.len() - at);
                b.splice(
                    at..at + n,
                    std::iter::repeat_n(b"{[\"\\\x00\xff"[rng.below(6)], 1 + rng.below(4096)),
                );
            }
            _ => {
                // A number in the JSON swapped for an extreme one.
                let starts: Vec<usize> = (1..b.len())
                    .filter(|&i| b[i].is_ascii_digit() && !b[i - 1].is_ascii_alphanumeric())
                    .collect();
                if let Some(&s) = starts.get(rng.below(starts.len())) {
                    let e = (s..b.len())
                        .find(|&i| !(b[i].is_ascii_digit() || b".eE-+".contains(&b[i])))
                        .unwrap_or(b.len());
                    b.splice(s..e, JSON_NUMBERS[rng.below(JSON_NUMBERS.len())].bytes());
                }
            }
        }
    }
    b
}

/// The mutated input of case `seed` of `kind`, and the fixture file it replaces.
fn case_input(kind: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let files = seeds(kind);
    let file = files[rng.below(files.len())].clone();
    let bytes = std::fs::read(&file).unwrap();
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let focus = match kind {
        "safetensors" => 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize,
        "drafter" if ext == "safetensors" => {
            8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
        }
        "gguf" => 1 << 16,
        "drafter" if ext == "gguf" => 1 << 16,
        "image" | "video" | "audio" => 512,
        _ => bytes.len(),
    };
    let json = file.extension().is_some_and(|e| e == "json");
    if json && rng.below(2) == 0 {
        // Half the JSON cases stay JSON: values swapped, so validation is reached.
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        for _ in 0..1 + rng.below(3) {
            mutate_json(&mut v, &mut rng);
        }
        return (file, serde_json::to_vec(&v).unwrap());
    }
    let deep = matches!(kind, "image" | "video" | "audio");
    (file, mutate(bytes, &mut rng, focus, json, deep))
}

/// One value somewhere in `v` replaced by an extreme or ill-typed one, or removed.
fn mutate_json(v: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::{json, Value};
    fn paths(v: &Value, at: String, out: &mut Vec<String>) {
        out.push(at.clone());
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    paths(
                        x,
                        format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                        out,
                    );
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    paths(x, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut all = Vec::new();
    paths(v, String::new(), &mut all);
    // Mostly the top levels (configs' fields), sometimes anywhere.
    let shallow: Vec<&String> = all.iter().filter(|p| p.matches('/').count() <= 3).collect();
    let path = if rng.below(4) > 0 && !shallow.is_empty() {
        shallow[rng.below(shallow.len())].clone()
    } else {
        all[rng.below(all.len())].clone()
    };
    let replacement = match rng.below(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1e308),
        3 => json!(4_294_967_296u64),
        4 => json!(u64::MAX),
        5 => json!(1e-300),
        6 => json!(0.5),
        7 => json!(1_000_000_000),
        8 => json!(""),
        9 => json!("\u{1b}[31m\nerror: forged"),
        10 => json!("x".repeat(100_000)),
        11 => Value::Null,
        12 => json!(true),
        13 => json!([]),
        14 => json!({}),
        _ => {
            // Removed from its parent.
            if let Some((parent, key)) = path.rsplit_once('/') {
                match v.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>() {
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
            return;
        }
    };
    if let Some(slot) = v.pointer_mut(&path) {
        *slot = replacement;
    }
}

/// Runs case `seed` of `kind` here: `Ok` for a result or a clean error (its message).
fn run_case(kind: &str, seed: u64) -> Result<String, String> {
    use gemma4::{Gemma4, LoadOptions, Media, Prompt};
    let (file, input) = case_input(kind, seed);
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    // `GEMMA4_FUZZ_DUMP=DIR` keeps the case's input, to look at or to reproduce elsewhere.
    if let Ok(dir) = std::env::var("GEMMA4_FUZZ_DUMP") {
        std::fs::write(
            Path::new(&dir).join(format!("{kind}-{seed}-{name}")),
            &input,
        )
        .unwrap();
    }
    let err = |e: gemma4::Error| e.to_string();
    // Kinds that are a file of a checkpoint: a scratch copy of its directory.
    let checkpoint = || -> Result<PathBuf, String> {
        let dir = scratch_dir(std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if !name.ends_with(".gguf") {
            for e in std::fs::read_dir(file.parent().unwrap()).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_file() {
                    std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
                }
            }
        }
        std::fs::write(dir.join(&name), &input).unwrap();
        Ok(dir)
    };
    let message = match kind {
        "gguf" | "safetensors" | "config" | "processor" | "tokenizer" => {
            let dir = checkpoint()?;
            match Gemma4::load(&dir, LoadOptions::default()) {
                Err(e) => err(e),
                Ok(model) => {
                    match model.prepare(&Prompt::Text("Hello there".into()), &Media::default()) {
                        Err(e) => err(e),
                        Ok(input) => {
                            let opts = gemma4::GenerateOptions {
                                max_new_tokens: 2,
                                sampling: gemma4::SamplingParams::greedy(),
                                stop_ids: vec![],
                                adapters: Default::default(),
                                constraint: None,
                                draft: None,
                            };
                            match gemma4::generate_from(&model.text, &input, &opts, |_| Ok(())) {
                                Err(e) => err(e),
                                Ok(_) => "ok".into(),
                            }
                        }
                    }
                }
            }
        }
        "drafter" => {
            let dir = checkpoint()?;
            let target = if name.ends_with(".gguf") {
                "dense_keqv"
            } else {
                "e2b_like"
            };
            let model = Gemma4::load(&fixture(target), LoadOptions::default()).map_err(err)?;
            match gemma4::draft::Drafter::load(&dir, &model.text) {
                Err(e) => err(e),
                Ok(d) => {
                    let k = d.config().num_assistant_tokens.unwrap_or(4).min(8);
                    let draft =
                        gemma4::generate::speculative::DraftOptions::new(std::sync::Arc::new(d), k)
                            .map_err(err)?;
                    let opts = gemma4::GenerateOptions {
                        max_new_tokens: 4,
                        sampling: gemma4::SamplingParams::greedy(),
                        stop_ids: vec![],
                        adapters: Default::default(),
                        constraint: None,
                        draft: Some(draft),
                    };
                    let input = gemma4::PromptInput::text(vec![2, 300, 301, 302]);
                    match gemma4::generate_from(&model.text, &input, &opts, |_| Ok(())) {
                        Err(e) => err(e),
                        Ok(_) => "ok".into(),
                    }
                }
            }
        }
        "template" => {
            let src = String::from_utf8_lossy(&input);
            let msgs = [gemma4::prompt::chat::Message::new("user", "hi")];
            match gemma4::prompt::chat::ChatTemplate::new(Some(&src), "<bos>", "<eos>")
                .and_then(|t| t.render(&msgs, true))
            {
                Err(e) => err(e),
                Ok(_) => "ok".into(),
            }
        }
        "image" => match gemma4::vision::image_processor::decode_image(&input, &name) {
            Err(e) => err(e),
            Ok(_) => "ok".into(),
        },
        "video" => {
            match gemma4::vision::video::decode_video(&input, &name, 8, &gemma4::Limits::DEFAULT) {
                Err(e) => err(e),
                Ok(_) => "ok".into(),
            }
        }
        "audio" => match gemma4::audio::decode::decode_audio(&input, &name)
            .and_then(|a| a.resampled(16_000))
        {
            Err(e) => err(e),
            Ok(_) => "ok".into(),
        },
        _ => unreachable!(),
    };
    if message.chars().any(char::is_control) {
        return Err(format!("raw control character in the message: {message:?}"));
    }
    Ok(message)
}

/// The child's side: one case from `GEMMA4_FUZZ_CASE=kind:seed`, in 4 GiB of address space.
#[test]
fn fuzz_child() {
    let Ok(case) = std::env::var("GEMMA4_FUZZ_CASE") else {
        return;
    };
    let (kind, seed) = case.split_once(':').unwrap();
    #[cfg(unix)]
    {
        let limit = libc::rlimit {
            rlim_cur: 4 << 30,
            rlim_max: 4 << 30,
        };
        // SAFETY: a plain system call on a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) };
    }
    match run_case(kind, seed.parse().unwrap()) {
        Ok(m) => println!("FUZZ-OUTCOME {}", if m == "ok" { "ok" } else { "error" }),
        Err(m) => println!("FUZZ-OUTCOME badmessage {m}"),
    }
}

/// Where the child with process id `pid` copies its checkpoint.
fn scratch_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("gemma4-fuzz-{pid}"))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How one case ended.
fn outcome(kind: &str, seed: u64, timeout: Duration) -> String {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fuzz_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("GEMMA4_FUZZ_CASE", format!("{kind}:{seed}"))
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // The child's scratch checkpoint, removed whatever way the child ends.
    let scratch = scratch_dir(child.id());
    let _cleanup = RemoveOnDrop(scratch);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return "timeout".into();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // libtest prints its own `test fuzz_child ... ` in front of the line.
    if let Some(line) = stdout.split("FUZZ-OUTCOME ").nth(1) {
        if out.status.success() {
            return line.split([' ', '\n']).next().unwrap().to_string();
        }
    }
    if stderr.contains("memory allocation of") {
        "oom".into()
    } else if stdout.contains("panicked") || stderr.contains("panicked") {
        "panic".into()
    } else {
        "crash".into()
    }
}

/// Runs `runs` cases from `first_seed`, two at a time; counts by outcome and kind, and the
/// failing cases.
fn campaign(
    runs: u64,
    first_seed: u64,
    timeout: Duration,
) -> (BTreeMap<(String, String), usize>, Vec<String>) {
    let counts = std::sync::Mutex::new(BTreeMap::new());
    let failures = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= runs {
                    break;
                }
                let kind = KINDS[(i % KINDS.len() as u64) as usize];
                let seed = first_seed + i;
                let o = outcome(kind, seed, timeout);
                if !matches!(o.as_str(), "ok" | "error") {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{o}: GEMMA4_FUZZ_CASE={kind}:{seed}"));
                }
                *counts
                    .lock()
                    .unwrap()
                    .entry((o, kind.to_string()))
                    .or_insert(0) += 1;
            });
        }
    });
    (counts.into_inner().unwrap(), failures.into_inner().unwrap())
}

/// CI's short run (`GEMMA4_FUZZ_RUNS` overrides the count, `GEMMA4_FUZZ_SEED` the start).
#[test]
fn fuzz_briefly() {
    if std::env::var("GEMMA4_FUZZ_CASE").is_ok() {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = env("GEMMA4_FUZZ_RUNS", 300);
    let seed = env("GEMMA4_FUZZ_SEED", 1);
    let (counts, failures) = campaign(
        runs,
        seed,
        Duration::from_secs(env("GEMMA4_FUZZ_TIMEOUT", 30)),
    );
    let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
    for ((o, kind), n) in &counts {
        *by_outcome.entry(o).or_default() += n;
        println!("{o:>10} {kind:<12} {n}");
    }
    println!("{runs} cases from seed {seed}: {by_outcome:?}");
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}
