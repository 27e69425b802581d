//! Hostile files (issue 19): each case that once panicked, hung, allocated what its header
//! claimed or read outside the checkpoint now gets a one-line error naming the file, field
//! or limit, with control characters escaped.

mod common;

use std::path::Path;

use gemma4::audio::decode::decode_audio;
use gemma4::prompt::chat::{ChatTemplate, Message};
use gemma4::vision::image_processor::decode_image;
use gemma4::{Gemma4, LoadOptions, Media, Prompt};

use common::{fixture, Scratch};

/// The message of an error: one line, no raw control character.
fn one_line(e: impl std::fmt::Display) -> String {
    let msg = e.to_string();
    assert!(
        !msg.chars().any(char::is_control),
        "control character in: {msg:?}"
    );
    msg
}

fn load_err(dir: &Path) -> String {
    one_line(
        Gemma4::load(dir, LoadOptions::default())
            .err()
            .expect("loading must fail"),
    )
}

#[test]
fn shard_names_stay_inside_the_checkpoint() {
    for (i, bad) in [
        "../../etc/passwd",
        "/proc/self/environ",
        "sub/../model.safetensors",
    ]
    .into_iter()
    .enumerate()
    {
        let s = Scratch::of("dense_keqv", &format!("shard{i}"));
        s.edit_json("model.safetensors.index.json", |v| {
            let map = v["weight_map"].as_object_mut().unwrap();
            let first = map.keys().next().unwrap().clone();
            map[&first] = bad.into();
        });
        let e = load_err(&s.0);
        assert!(
            e.contains("not the name of a file in the checkpoint directory") && e.contains(bad),
            "{e}"
        );
    }
}

/// A config edit: what it breaks, how, and the word its error must contain.
type ConfigCase = (&'static str, fn(&mut serde_json::Value), &'static str);

#[test]
fn config_values_are_range_checked() {
    let cases: [ConfigCase; 8] = [
        (
            "heads",
            |v| v["num_attention_heads"] = u64::MAX.into(),
            "over the limit",
        ),
        (
            "ple",
            |v| v["hidden_size_per_layer_input"] = u64::MAX.into(),
            "over the limit",
        ),
        (
            "layers",
            |v| {
                v["num_hidden_layers"] = 1_000_000_000u64.into();
                v.as_object_mut().unwrap().remove("layer_types");
            },
            "num_hidden_layers",
        ),
        (
            "bos",
            |v| v["bos_token_id"] = (1u64 << 40).into(),
            "bos_token_id",
        ),
        (
            "eos",
            |v| v["eos_token_id"] = serde_json::json!([1, 1u64 << 33]),
            "below 2^32",
        ),
        ("eps", |v| v["rms_norm_eps"] = 0.0.into(), "rms_norm_eps"),
        (
            "cap",
            |v| v["final_logit_softcapping"] = (-1.0).into(),
            "final_logit_softcapping",
        ),
        (
            "rope",
            |v| v["rope_parameters"]["full_attention"]["partial_rotary_factor"] = 2.0.into(),
            "partial_rotary_factor",
        ),
    ];
    for (tag, edit, field) in cases {
        let s = Scratch::of("text_only", &format!("cfg-{tag}"));
        s.edit_json("config.json", edit);
        let e = load_err(&s.0);
        assert!(e.contains("config.json") && e.contains(field), "{tag}: {e}");
    }
}

#[test]
fn errors_do_not_repeat_their_source() {
    let e = load_err(Path::new("/nonexistent/gemma4-model"));
    assert_eq!(e.matches("not found").count(), 1, "{e}");
}

/// Tokenizer files that panic inside the `tokenizers` crate give an error naming the file.
#[test]
fn tokenizer_panics_become_errors() {
    let cases: [(&str, serde_json::Value); 2] = [
        (
            "fixed0",
            serde_json::json!({"pre_tokenizer": {"type": "FixedLength", "length": 0}}),
        ),
        (
            "template",
            serde_json::json!({"post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<missing>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}
            }}),
        ),
    ];
    for (tag, patch) in cases {
        let s = Scratch::of("text_only", &format!("tok-{tag}"));
        // Another tokenizer class, so the file's own pipeline is used as it is.
        s.edit_json("tokenizer_config.json", |v| {
            v["tokenizer_class"] = "PreTrainedTokenizerFast".into()
        });
        s.edit_json("tokenizer.json", |v| {
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
        });
        let e = match Gemma4::load(&s.0, LoadOptions::default()) {
            Err(e) => one_line(e),
            Ok(model) => one_line(
                model
                    .prepare(&Prompt::Text("hello there".into()), &Media::default())
                    .err()
                    .unwrap_or_else(|| panic!("{tag}: the prompt must fail")),
            ),
        };
        assert!(e.contains("tokenizer.json"), "{tag}: {e}");
    }
}

#[test]
fn templates_run_within_limits() {
    let render = |src: &str| {
        ChatTemplate::new(Some(src), "<bos>", "<eos>")
            .and_then(|t| t.render(&[Message::new("user", "hi")], true))
            .map_err(one_line)
    };
    // Nested loops: stopped by fuel instead of running for hours.
    let e =
        render("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
            .unwrap_err();
    assert!(e.contains("fuel"), "{e}");
    // A 100k-long expression chain: refused before compiling (it overflowed the stack).
    let chain = format!("{{{{ {} }}}}", vec!["1"; 100_000].join(" + "));
    let e = render(&chain).unwrap_err();
    assert!(e.contains("characters"), "{e}");
    // A chain just under the limit compiles and runs on a test thread's 2 MiB stack.
    let chain = format!("{{{{ {} }}}}", vec!["1"; 990].join("+"));
    assert!(chain.len() < 2_000);
    assert_eq!(render(&chain).unwrap(), "990");
    // Output past the limit.
    let e = render("{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}").unwrap_err();
    assert!(e.contains("exceeds"), "{e}");
    // Data is fuel too (minijinja charges one per 64 bytes produced): a string doubled in
    // a loop, or indented by a billion columns, stops at the limit instead of taking
    // gigabytes.
    for bomb in [
        "{% set ns = namespace(a='x' * 1000000) %}{% for i in range(14) %}\
         {% set ns.a = ns.a ~ ns.a %}{% endfor %}{{ ns.a | length }}",
        "{{ ('a\nb\nc\nd\ne\nf\ng\nh') | indent(1000000000) | length }}",
    ] {
        let t = std::time::Instant::now();
        let e = render(bomb).unwrap_err();
        assert!(e.contains("template_fuel"), "{e}");
        assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    }
    // Ordinary templates render.
    assert_eq!(render("{{ messages[0]['content'] }}").unwrap(), "hi");
}

#[test]
fn chat_template_in_the_list_form_is_used() {
    let s = Scratch::of("text_only", "tmpl-list");
    // `chat_template.jinja` would take precedence.
    std::fs::remove_file(s.0.join("chat_template.jinja")).unwrap();
    s.edit_json("tokenizer_config.json", |v| {
        v["chat_template"] = serde_json::json!([
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"}
        ]);
    });
    let t = ChatTemplate::from_dir(&s.0).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "x")], false).unwrap(),
        "DEFAULT x"
    );
    s.edit_json("tokenizer_config.json", |v| {
        v["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "T"}]);
    });
    let e = one_line(ChatTemplate::from_dir(&s.0).err().unwrap());
    assert!(
        e.contains("tokenizer_config.json") && e.contains("default"),
        "{e}"
    );
}

/// A PNG of `w × h` with its header and the start of its pixel data only.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([1, 0, 0, 0, 0]); // 1-bit greyscale
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c]);
    chunk(b"IEND", &[]);
    png
}

#[test]
fn images_over_the_pixel_limit_are_refused_from_the_header() {
    for (w, h) in [(65535, 65535), (20000, 20000)] {
        let t = std::time::Instant::now();
        let e = one_line(decode_image(&png_header(w, h), "bomb.png").unwrap_err());
        assert!(e.contains("bomb.png") && e.contains("limit"), "{e}");
        assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
    }
    // A JPEG whose header claims 30000 × 30000 (its SOF0 frame patched).
    let mut jpg = std::fs::read(fixture("images").join("portrait.jpg")).unwrap();
    let sof = jpg
        .windows(2)
        .position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2))
        .expect("SOF marker");
    jpg[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]);
    let e = one_line(decode_image(&jpg, "big.jpg").unwrap_err());
    assert!(e.contains("big.jpg") && e.contains("limit"), "{e}");
    // A JPEG cut short is an error, as in Pillow.
    let jpg = std::fs::read(fixture("images").join("large.jpg")).unwrap();
    let e = one_line(decode_image(&jpg[..jpg.len() / 2], "cut.jpg").unwrap_err());
    assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
}

/// A 16-bit mono WAV of `samples` zeros declaring `rate` Hz.
fn wav(rate: u32, samples: usize) -> Vec<u8> {
    let data = samples as u32 * 2;
    let mut w = b"RIFF".to_vec();
    w.extend((36 + data).to_le_bytes());
    w.extend(b"WAVEfmt ");
    w.extend(16u32.to_le_bytes());
    w.extend(1u16.to_le_bytes());
    w.extend(1u16.to_le_bytes());
    w.extend(rate.to_le_bytes());
    w.extend(rate.wrapping_mul(2).to_le_bytes());
    w.extend(2u16.to_le_bytes());
    w.extend(16u16.to_le_bytes());
    w.extend(b"data");
    w.extend(data.to_le_bytes());
    w.resize(w.len() + data as usize, 0);
    w
}

#[test]
fn audio_sample_rates_are_range_checked() {
    assert!(decode_audio(&wav(16_000, 1600), "ok.wav").is_ok());
    for rate in [1, 4_294_967_291] {
        let t = std::time::Instant::now();
        let e = one_line(decode_audio(&wav(rate, 1600), "odd.wav").unwrap_err());
        assert!(e.contains("odd.wav") && e.contains("Hz"), "{rate}: {e}");
        assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
    }
}

#[test]
fn processor_config_values_are_bounded() {
    let s = Scratch::of("audio_small", "proc");
    for (key, value) in [
        ("sampling_rate", serde_json::json!(1u64 << 32)),
        ("frame_length_ms", serde_json::json!(1e300)),
        ("feature_size", serde_json::json!(1_000_000_000u64)),
    ] {
        s.edit_json("processor_config.json", |v| {
            v["feature_extractor"][key] = value.clone();
        });
        let e = load_err(&s.0);
        assert!(
            e.contains("processor_config.json") && e.contains(key),
            "{key}: {e}"
        );
        std::fs::copy(
            fixture("audio_small").join("processor_config.json"),
            s.0.join("processor_config.json"),
        )
        .unwrap();
    }
}

#[test]
fn text_too_long_for_any_context_is_refused_before_tokenizing() {
    let model = Gemma4::load(&fixture("text_only"), LoadOptions::default()).unwrap();
    let huge = "a ".repeat(17 << 20);
    let t = std::time::Instant::now();
    let e = one_line(
        model
            .prepare(&Prompt::Text(huge), &Media::default())
            .expect_err("must be refused"),
    );
    assert!(e.contains("prompt") && e.contains("bytes"), "{e}");
    assert!(t.elapsed().as_secs() < 2, "took {:?}", t.elapsed());
}

#[test]
fn a_gguf_file_under_a_safetensors_name_is_recognised() {
    let s = Scratch::of("text_only", "gguf-named");
    std::fs::copy(
        fixture("llamacpp").join("e2b_like-bf16.gguf"),
        s.join("model.safetensors"),
    )
    .unwrap();
    let e = load_err(&s);
    assert!(
        e.contains("model.safetensors") && e.contains("GGUF file"),
        "{e}"
    );
}

/// A sliding window far longer than any prompt allocates only what the sequence uses (a
/// config's window of 2^24 once preallocated 2^24 slots per sliding layer).
#[test]
fn a_huge_sliding_window_costs_only_what_is_used() {
    let s = Scratch::of("text_only", "window");
    s.edit_json("config.json", |v| {
        v["sliding_window"] = (1u64 << 24).into();
        v["max_position_embeddings"] = (1u64 << 24).into();
    });
    let model = Gemma4::load(&s, LoadOptions::default()).unwrap();
    let opts = gemma4::GenerateOptions {
        max_new_tokens: 3,
        sampling: gemma4::SamplingParams::greedy(),
        stop_ids: vec![],
        adapters: Default::default(),
        constraint: None,
        draft: None,
    };
    let mut seq = gemma4::Sequence::new(
        &model.text,
        gemma4::PromptInput::text(vec![2, 10, 11, 12]),
        &opts,
    )
    .unwrap();
    while !seq.is_finished() {
        gemma4::step(&model.text, &mut [&mut seq], usize::MAX).unwrap();
    }
    let bytes = seq.cache().bytes();
    assert!(bytes < 1 << 20, "the cache holds {bytes} bytes");
}

#[test]
fn every_limit_can_be_set_and_its_error_names_it() {
    use gemma4::audio::decode::decode_audio_with;
    use gemma4::vision::image_processor::decode_image_with;
    use gemma4::vision::video::decode_video;
    use gemma4::Limits;
    let d = Limits::DEFAULT;
    let expect_named = |r: Result<(), String>, field: &str| {
        let e = r.expect_err(field);
        let flag = format!("--{}", field.replace('_', "-"));
        assert!(e.contains(field) && e.contains(&flag), "{field}: {e}");
    };
    // Image pixels: exactly at the limit passes, one under refuses.
    let png = std::fs::read(fixture("images").join("landscape.png")).unwrap();
    let img = decode_image(&png, "l.png").unwrap();
    let px = (img.width * img.height) as u64;
    let at = |max_image_pixels| Limits {
        max_image_pixels,
        ..d
    };
    assert_eq!(decode_image_with(&png, "l.png", &at(px)).unwrap(), img);
    expect_named(
        decode_image_with(&png, "l.png", &at(px - 1))
            .map(drop)
            .map_err(one_line),
        "max_image_pixels",
    );
    let jpg = std::fs::read(fixture("images").join("portrait.jpg")).unwrap();
    expect_named(
        decode_image_with(&jpg, "p.jpg", &at(100))
            .map(drop)
            .map_err(one_line),
        "max_image_pixels",
    );
    // GIF frames and the pixels of all frames together.
    let gif = std::fs::read(fixture("images").join("clip.gif")).unwrap();
    let all = decode_video(&gif, "c.gif", usize::MAX, &d).unwrap();
    let n = all.frames.len();
    let frame_px = (all.frames[0].width * all.frames[0].height) as u64;
    let frames = |max_video_frames| Limits {
        max_video_frames,
        ..d
    };
    assert_eq!(
        decode_video(&gif, "c.gif", 2, &frames(n))
            .unwrap()
            .indices
            .len(),
        2
    );
    expect_named(
        decode_video(&gif, "c.gif", 2, &frames(n - 1))
            .map(drop)
            .map_err(one_line),
        "max_video_frames",
    );
    let pixels = |max_video_pixels| Limits {
        max_video_pixels,
        ..d
    };
    assert!(decode_video(&gif, "c.gif", 2, &pixels(frame_px * n as u64)).is_ok());
    expect_named(
        decode_video(&gif, "c.gif", 2, &pixels(frame_px * n as u64 - 1))
            .map(drop)
            .map_err(one_line),
        "max_video_pixels",
    );
    // A frame directory with more files than allowed.
    let s = Scratch::empty("frames");
    for i in 0..3 {
        std::fs::write(s.0.join(format!("{i}.png")), &png).unwrap();
    }
    let dir_video = |max_video_frames| {
        gemma4::vision::video::load_video(
            &s.0,
            2,
            &Limits {
                max_video_frames,
                ..d
            },
        )
    };
    assert_eq!(dir_video(3).unwrap().frames.len(), 2);
    expect_named(dir_video(2).map(drop).map_err(one_line), "max_video_frames");
    // Audio: decoding stops after the limit's seconds (the rest is not read).
    let clip = wav(16_000, 48_000);
    let secs = |max_audio_seconds| Limits {
        max_audio_seconds,
        ..d
    };
    assert_eq!(
        decode_audio_with(&clip, "a.wav", &secs(1))
            .unwrap()
            .samples
            .len(),
        16_000
    );
    assert_eq!(
        decode_audio_with(&clip, "a.wav", &d).unwrap().samples.len(),
        48_000
    );
    // Templates: fuel, tag length, output size.
    let render = |src: &str, limits: Limits| {
        ChatTemplate::from_source(Some(src), "<bos>", "<eos>", "t.jinja", &limits)
            .and_then(|t| t.render(&[Message::new("user", "hi")], true))
            .map_err(one_line)
    };
    let looped = "{% for i in range(50) %}x{% endfor %}";
    assert_eq!(render(looped, d).unwrap().len(), 50);
    expect_named(
        render(
            looped,
            Limits {
                template_fuel: 20,
                ..d
            },
        )
        .map(drop),
        "template_fuel",
    );
    let chain = format!("{{{{ {} }}}}", vec!["1"; 100].join("+"));
    assert_eq!(render(&chain, d).unwrap(), "100");
    expect_named(
        render(
            &chain,
            Limits {
                max_template_tag_chars: 100,
                ..d
            },
        )
        .map(drop),
        "max_template_tag_chars",
    );
    let wide = "{{ 'x' * 1000 }}";
    let out = |max_template_output_bytes| Limits {
        max_template_output_bytes,
        ..d
    };
    assert_eq!(render(wide, out(1000)).unwrap().len(), 1000);
    expect_named(
        render(wide, out(999)).map(drop),
        "max_template_output_bytes",
    );
    // A loaded model keeps its limits: its tokenizer, chat template and media loaders use
    // them.
    let tight = Limits {
        max_prompt_bytes: 64,
        template_fuel: 5,
        max_image_pixels: 100,
        ..d
    };
    let model = Gemma4::load(
        &fixture("text_only"),
        LoadOptions {
            limits: tight,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(model.limits, tight);
    let prepare = |p: Prompt| {
        model
            .prepare(&p, &Media::default())
            .map(drop)
            .map_err(one_line)
    };
    assert!(prepare(Prompt::Text("a ".repeat(32))).is_ok());
    expect_named(prepare(Prompt::Text("a ".repeat(33))), "max_prompt_bytes");
    expect_named(
        prepare(Prompt::Chat(vec![Message::new("user", "hi")])),
        "template_fuel",
    );
    expect_named(
        model
            .load_image(&fixture("images").join("landscape.png"))
            .map(drop)
            .map_err(one_line),
        "max_image_pixels",
    );
}
