//! The `kandinsky` binary on the tiny fixture pipelines: every subcommand, the PNG text
//! chunk, `--seed` reproducibility and the errors a new user meets.

mod common;

use common::{fixtures, ok, pixels, scratch, write_png};

use std::path::Path;
use std::process::{Command, Output};

fn kandinsky(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kandinsky"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("kandinsky-cli-cache"),
        )
        .output()
        .expect("the binary runs")
}

fn tiny(repo: &str) -> String {
    common::tiny(repo).display().to_string()
}

/// Width, height and text chunks of a PNG.
fn png_info(path: &Path) -> (u32, u32, Vec<(String, String)>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    text.extend(
        info.utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap())),
    );
    (info.width, info.height, text)
}

/// Replace the value of `flag` in `args`.
fn set<'a>(args: &mut [&'a str], flag: &str, value: &'a str) {
    let i = args.iter().position(|a| *a == flag).expect("flag present") + 1;
    args[i] = value;
}

fn base<'a>(prior: &'a str, decoder: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--prompt",
        "a red cat",
        "--prior",
        prior,
        "--decoder",
        decoder,
        "--steps",
        "2",
        "--prior-steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "7",
        "--out",
        out,
    ]
}

#[test]
fn text2img_writes_png_with_parameters_and_seed_reproduces() {
    let d = scratch("t2i");
    let prior = tiny("kandinsky-2-2-prior");
    let dec = tiny("kandinsky-2-2-decoder");
    let a = d.join("a.png").display().to_string();
    let b = d.join("b.png").display().to_string();
    let mut args = vec!["text2img"];
    args.extend(base(&prior, &dec, &a));
    ok(&kandinsky(&args));
    let mut args = vec!["text2img"];
    args.extend(base(&prior, &dec, &b));
    ok(&kandinsky(&args));
    let (w, h, text) = png_info(Path::new(&a));
    assert_eq!((w, h), (64, 64));
    let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some("a red cat"));
    assert_eq!(get("seed").as_deref(), Some("7"));
    assert_eq!(get("steps").as_deref(), Some("2"));
    assert_eq!(get("size").as_deref(), Some("64x64"));
    assert!(get("models").unwrap().contains("kandinsky-2-2-decoder"));
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same seed, same bytes"
    );
    // Another seed gives another image.
    let c = d.join("c.png").display().to_string();
    let mut args = vec!["text2img"];
    args.extend(base(&prior, &dec, &c));
    set(&mut args, "--seed", "8");
    ok(&kandinsky(&args));
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn batches_get_numbered_files_and_sizes_round_up_to_64() {
    let d = scratch("batch");
    let out = d.join("img.png").display().to_string();
    let (prior, dec) = (tiny("kandinsky-2-2-prior"), tiny("kandinsky-2-2-decoder"));
    let mut args = vec!["text2img"];
    args.extend(base(&prior, &dec, &out));
    set(&mut args, "--width", "100");
    args.extend(["--num-images", "2"]);
    ok(&kandinsky(&args));
    for i in 0..2 {
        let (w, h, _) = png_info(&d.join(format!("img-{i}.png")));
        assert_eq!((w, h), (128, 64));
    }
}

#[test]
fn prior_then_decoder_from_saved_embeddings() {
    let d = scratch("prior");
    let emb = d.join("e.safetensors").display().to_string();
    let prior = tiny("kandinsky-2-2-prior");
    ok(&kandinsky(&[
        "prior",
        "--prompt",
        "a dog",
        "--prior",
        &prior,
        "--prior-steps",
        "2",
        "--out",
        &emb,
    ]));
    let t = candle_core::safetensors::load(&emb, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["image_embeds"].dims(), &[1, 32]);
    assert_eq!(t["negative_image_embeds"].dims(), &[1, 32]);
    let out = d.join("o.png").display().to_string();
    let dec = tiny("kandinsky-2-2-decoder");
    ok(&kandinsky(&[
        "text2img",
        "--image-embeds",
        &emb,
        "--decoder",
        &dec,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        &out,
    ]));
    assert_eq!(png_info(Path::new(&out)).0, 64);
}

#[test]
fn img2img_inpaint_controlnet_and_mix_run() {
    let d = scratch("flows");
    let img = d.join("in.png");
    write_png(&img, 64, 64, |x, y| [(x * 4) as u8, (y * 4) as u8, 128]);
    let mask = d.join("mask.png");
    write_png(&mask, 64, 64, |x, _| if x > 32 { [255; 3] } else { [0; 3] });
    let (prior, dec) = (tiny("kandinsky-2-2-prior"), tiny("kandinsky-2-2-decoder"));
    let (inp, cn) = (
        tiny("kandinsky-2-2-decoder-inpaint"),
        tiny("kandinsky-2-2-controlnet-depth"),
    );
    let (img_s, mask_s) = (img.display().to_string(), mask.display().to_string());
    let fusion = fixtures().join("pipeline/fusion.png").display().to_string();
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "img2img",
            dec.as_str(),
            vec!["--image", &img_s, "--strength", "0.5"],
        ),
        (
            "inpaint",
            inp.as_str(),
            vec!["--image", &img_s, "--mask", &mask_s],
        ),
        ("controlnet", cn.as_str(), vec!["--hint", &img_s]),
        (
            "controlnet",
            cn.as_str(),
            vec!["--hint", &img_s, "--image", &img_s, "--strength", "0.5"],
        ),
        (
            "mix",
            dec.as_str(),
            vec![
                "--text-weight",
                "0.4",
                "--mix-image",
                &fusion,
                "--image-weight",
                "0.6",
            ],
        ),
    ];
    for (i, (cmd, decoder, extra)) in cases.into_iter().enumerate() {
        let out = d.join(format!("{cmd}-{i}.png")).display().to_string();
        let mut args = vec![cmd];
        args.extend(base(&prior, decoder, &out));
        args.extend(extra);
        ok(&kandinsky(&args));
        assert_eq!(png_info(Path::new(&out)).0, 64, "{cmd}");
    }
}

fn fails_with(args: &[&str], needle: &str) {
    let out = kandinsky(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn errors_are_one_clear_line() {
    let d = scratch("errors");
    let prior = tiny("kandinsky-2-2-prior");
    let dec = tiny("kandinsky-2-2-decoder");
    let out = d.join("o.png").display().to_string();
    // A folder that is not a diffusers pipeline.
    let not_pipeline = d.display().to_string();
    let mut a = vec!["text2img"];
    a.extend(base(&prior, &not_pipeline, &out));
    fails_with(&a, "model_index.json");
    // No weights and no network: a hub id with HF_HUB_OFFLINE and an empty cache.
    let mut a = vec!["text2img"];
    a.extend(base(
        &prior,
        "kandinsky-community/kandinsky-2-2-decoder",
        &out,
    ));
    fails_with(&a, "HF_HUB_OFFLINE");
    // An unreadable image.
    let bad = d.join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let bad_s = bad.display().to_string();
    let mut a = vec!["img2img"];
    a.extend(base(&prior, &dec, &out));
    a.extend(["--image", &bad_s]);
    fails_with(&a, "cannot decode");
    // A mask of the wrong size.
    let img = d.join("in.png");
    write_png(&img, 64, 64, |_, _| [10, 20, 30]);
    let mask = d.join("m.png");
    write_png(&mask, 32, 32, |_, _| [255; 3]);
    let (img_s, mask_s) = (img.display().to_string(), mask.display().to_string());
    let inp = tiny("kandinsky-2-2-decoder-inpaint");
    let mut a = vec!["inpaint"];
    a.extend(base(&prior, &inp, &out));
    a.extend(["--image", &img_s, "--mask", &mask_s]);
    fails_with(&a, "same size");
    // A size the flow cannot take (img2img needs multiples of 64).
    let mut a = vec!["img2img"];
    a.extend(base(&prior, &dec, &out));
    set(&mut a, "--width", "96");
    a.extend(["--image", &img_s]);
    fails_with(&a, "multiples of 64");
    // Inpainting with the plain decoder.
    let mut a = vec!["inpaint"];
    a.extend(base(&prior, &dec, &out));
    a.extend(["--image", &img_s, "--mask", &img_s]);
    fails_with(&a, "9-channel");
}

#[test]
fn every_scheduler_choice_runs_and_changes_the_image() {
    let d = scratch("sched");
    let (prior, dec) = (tiny("kandinsky-2-2-prior"), tiny("kandinsky-2-2-decoder"));
    let mut outputs = Vec::new();
    for s in ["default", "ddpm", "ddim", "dpm-solver"] {
        let out = d.join(format!("{s}.png")).display().to_string();
        let mut args = vec!["text2img"];
        args.extend(base(&prior, &dec, &out));
        args.extend(["--scheduler", s]);
        ok(&kandinsky(&args));
        let (_, _, text) = png_info(Path::new(&out));
        let sched = text
            .iter()
            .find(|(k, _)| k == "scheduler")
            .map(|(_, v)| v.clone());
        assert_eq!(sched.as_deref(), Some(s.replace('-', "").as_str()));
        outputs.push(pixels(Path::new(&out)));
    }
    // The decoder's scheduler is DDPM: "default" and "ddpm" give the same pixels, the
    // deterministic solvers other images.
    assert_eq!(outputs[0], outputs[1]);
    assert_ne!(outputs[1], outputs[2]);
    assert_ne!(outputs[2], outputs[3]);
}

fn text_of(path: &Path, key: &str) -> Option<String> {
    png_info(path)
        .2
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[test]
fn kandinsky_2_1_flows_run_with_prompts_in_any_language() {
    let d = scratch("v21");
    let prior = tiny("kandinsky-2-1-prior");
    let (dec, inp) = (tiny("kandinsky-2-1"), tiny("kandinsky-2-1-inpaint"));
    // text2img, Russian prompt, through the 2.1 prior and decoder.
    let a = d.join("ru.png").display().to_string();
    let mut args = vec!["text2img", "--kandinsky", "2.1"];
    args.extend(base(&prior, &dec, &a));
    set(&mut args, "--prompt", "рыжий кот на диване");
    ok(&kandinsky(&args));
    let (w, h, _) = png_info(Path::new(&a));
    assert_eq!((w, h), (64, 64));
    // The prompt is stored as UTF-8 (iTXt): tEXt cannot hold Cyrillic.
    assert_eq!(
        text_of(Path::new(&a), "prompt").as_deref(),
        Some("рыжий кот на диване")
    );

    // The 2.1 decoder reads the prompt itself: same embeddings and seed, another prompt
    // (Chinese) gives another image, the same prompt the same bytes.
    let emb = d.join("emb.safetensors").display().to_string();
    ok(&kandinsky(&[
        "prior",
        "--kandinsky",
        "2.1",
        "--prior",
        &prior,
        "--prompt",
        "a red cat",
        "--prior-steps",
        "2",
        "--out",
        &emb,
    ]));
    let mut images = Vec::new();
    for (name, prompt) in [("zh", "一只红猫"), ("zh2", "一只红猫"), ("en", "a red cat")] {
        let out = d.join(format!("{name}.png")).display().to_string();
        let mut args = vec!["text2img", "--kandinsky", "2.1", "--image-embeds", &emb];
        args.extend(base(&prior, &dec, &out));
        set(&mut args, "--prompt", prompt);
        ok(&kandinsky(&args));
        images.push(pixels(Path::new(&out)));
    }
    assert_eq!(images[0], images[1]);
    assert_ne!(images[0], images[2]);

    // img2img, inpainting and 2.1's shipped DDPM scheduler.
    let img = d.join("in.png");
    write_png(&img, 64, 64, |x, y| [(x * 4) as u8, (y * 4) as u8, 128]);
    let mask = d.join("mask.png");
    write_png(&mask, 64, 64, |x, _| if x > 32 { [255; 3] } else { [0; 3] });
    let (img_s, mask_s) = (img.display().to_string(), mask.display().to_string());
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "img2img",
            dec.as_str(),
            vec!["--image", &img_s, "--strength", "0.5"],
        ),
        (
            "inpaint",
            inp.as_str(),
            vec!["--image", &img_s, "--mask", &mask_s],
        ),
        (
            "text2img",
            dec.as_str(),
            vec!["--scheduler", "shipped-ddpm"],
        ),
    ];
    for (i, (cmd, decoder, extra)) in cases.into_iter().enumerate() {
        let out = d.join(format!("{cmd}-{i}.png")).display().to_string();
        let mut args = vec![cmd, "--kandinsky", "2.1"];
        args.extend(base(&prior, decoder, &out));
        set(&mut args, "--prompt", "Ein roter Kater auf dem Sofa");
        args.extend(extra);
        ok(&kandinsky(&args));
        assert_eq!(png_info(Path::new(&out)).0, 64, "{cmd}");
    }

    // ControlNet has no 2.1 checkpoint.
    let out = d.join("cn.png").display().to_string();
    fails_with(
        &[
            "controlnet",
            "--kandinsky",
            "2.1",
            "--prompt",
            "x",
            "--prior",
            &prior,
            "--hint",
            &img_s,
            "--out",
            &out,
        ],
        "only for Kandinsky 2.2",
    );
}
