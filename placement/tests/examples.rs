//! Known cases, checkable by hand: Llama-3-8B under {"0": "10GiB", "cpu": "30GiB"}, an
//! all-fits model, a 70B model that spills to disk, and the balanced strategies on two GPUs.

use spillway_placement::*;

const GIB: u64 = 1 << 30;

fn llama(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
) -> ModelShape {
    ModelShape::from_config(&serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": vocab, "max_position_embeddings": 8192, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"
    }))
    .expect("shape")
}

fn shape_from(config: &str) -> ModelShape {
    let config: serde_json::Value = serde_json::from_str(config).expect("config");
    ModelShape::from_config(&config).expect("shape")
}

fn machine(gpus: &[u64], cpu: u64) -> Machine {
    Machine {
        gpus: gpus
            .iter()
            .enumerate()
            .map(|(ordinal, &gib)| GpuMemory {
                ordinal,
                free: gib * GIB,
                total: gib * GIB,
            })
            .collect(),
        cpu_available: cpu * GIB,
        cpu_total: cpu * GIB,
        cpu_reserve: None,
    }
}

struct Case {
    units: Vec<PlacementUnit>,
    budgets: Budgets,
    reserve: Reserve,
}

fn case(
    shape: &ModelShape,
    machine: &Machine,
    max_memory: serde_json::Value,
    batch: usize,
    seq: usize,
) -> Case {
    let units = inventory::units(&shape.tensors(), None, shape.tie_word_embeddings);
    let budgets = Budgets::new(
        machine,
        &MaxMemory::from_json(&max_memory).expect("max_memory"),
    )
    .expect("budgets");
    let reserve = shape.reserve(batch, seq, shape.dtype.unwrap_or(TensorDType::F32));
    Case {
        units,
        budgets,
        reserve,
    }
}

fn run(case: &Case, strategy: &str) -> Result<Plan, PlanError> {
    plan_with(case, serde_json::json!(strategy))
}

/// The plan of `case` under setup_config's `device_map` (a strategy name or a map).
fn plan_with(case: &Case, device_map: serde_json::Value) -> Result<Plan, PlanError> {
    let strategy = Strategy::from_json(Some(&device_map), 0).expect("device_map");
    plan(&PlanRequest {
        units: &case.units,
        budgets: &case.budgets,
        strategy: &strategy,
        reserve: case.reserve,
        disk: DiskAccess::Mapped,
    })
}

fn on(plan: &Plan, device: Device) -> Vec<&str> {
    plan.units
        .iter()
        .filter(|u| u.device == device)
        .map(|u| u.name.as_str())
        .collect()
}

fn within_budgets(plan: &Plan) {
    for d in &plan.devices {
        if let Some(budget) = d.budget {
            assert!(
                d.weights + d.reserve <= budget,
                "{} over budget: {d:?}",
                d.device
            );
        }
    }
}

#[test]
fn llama3_8b_under_10gib_gpu_and_30gib_cpu() {
    let shape = llama(4096, 14336, 32, 32, 8, 128256);
    let c = case(
        &shape,
        &machine(&[80], 64),
        serde_json::json!({"0": "10GiB", "cpu": "30GiB"}),
        1,
        2048,
    );
    // bf16: each block 2 * (2*4096*4096 + 2*1024*4096 + 3*4096*14336 + 2*4096) = 436,224,000 bytes.
    assert_eq!(c.units[1].bytes, 436_224_000);
    assert_eq!(c.units[0].bytes, 128_256 * 4096 * 2, "embeddings");
    let p = run(&c, "auto").expect("fits");
    within_budgets(&p);
    // GPU 0 holds the embeddings (1,050,673,152 B), one pass of activations at 2048 tokens
    // (2048 * (4*4096 + 2*14336) * 2 = 184,549,376 for hidden states, 32 * 2048^2 * 2 =
    // 268,435,456 for attention scores, 128256 * 4 = 513,024 for logits: 453,497,856 B),
    // and as many blocks as fit with their KV caches (2 * 2048 * 8 * 128 * 2 = 8 MiB each):
    // (10 GiB - 1,504,171,008) / 444,612,608 = 20.8 -> 20 blocks.
    let gpu = on(&p, Device::cuda(0));
    assert_eq!(gpu[0], "model.embed_tokens");
    let blocks_on_gpu = gpu.len() - 1;
    let gpu_usage = p.usage(Device::cuda(0)).expect("gpu");
    let block_cost = 436_224_000 + 8 * (1 << 20);
    assert!(
        gpu_usage.weights + gpu_usage.reserve + block_cost > 10 * GIB,
        "GPU 0 is full: one more block would not fit"
    );
    assert_eq!(c.reserve.activations, 453_497_856);
    assert_eq!(blocks_on_gpu, 20, "{gpu:?}");
    // The rest is on the CPU, in order, and nothing on disk.
    let cpu = on(&p, Device::CPU);
    assert_eq!(cpu.first(), Some(&"model.layers.20"));
    assert_eq!(cpu.last(), Some(&"lm_head"));
    assert_eq!(p.streamed_bytes_per_forward, 0);
    let table = explain::table(&p);
    assert!(table.contains("model.layers.0..19 (20 blocks)"), "{table}");
}

#[test]
fn a_model_that_fits_maps_nothing_off_its_device() {
    let shape = shape_from(include_str!("../../../shared/refs/minilm_config.json"));
    let c = case(&shape, &machine(&[], 24), serde_json::json!({}), 8, 256);
    for strategy in ["auto", "sequential", "cpu"] {
        let p = run(&c, strategy).expect("fits");
        assert!(
            p.units.iter().all(|u| u.device == Device::CPU),
            "{strategy}"
        );
        assert_eq!(p.streamed_bytes_per_forward, 0);
        assert_eq!(p.usage(Device::CPU).expect("cpu").weights, 22_713_216 * 4);
        assert!(!p.computes_on_gpu(), "{strategy}");
    }
}

#[test]
fn a_70b_model_spills_to_disk_after_the_gpu_and_cpu() {
    // 68.98 B parameters in bf16 = 137.95 GB, on an 80 GiB GPU and 32 GiB of free RAM.
    let shape = llama(8192, 28672, 80, 64, 8, 32000);
    let c = case(&shape, &machine(&[80], 32), serde_json::json!({}), 1, 4096);
    let p = run(&c, "auto").expect("disk is unlimited");
    within_budgets(&p);
    let kinds: Vec<Device> = p.units.iter().map(|u| u.device).collect();
    let first_disk = kinds
        .iter()
        .position(|d| *d == Device::DISK)
        .expect("some units on disk");
    assert!(
        kinds[first_disk..].iter().all(|d| *d == Device::DISK),
        "disk is the tail of the chain"
    );
    assert!(on(&p, Device::cuda(0)).len() > 30 && !on(&p, Device::CPU).is_empty());
    assert_eq!(
        p.stream_device,
        Device::cuda(0),
        "disk units run on the GPU"
    );
    assert!(p.computes_on_gpu());
    // Disk units alone compute on the GPU when it streams them.
    let mut streamed_only = p.clone();
    for unit in &mut streamed_only.units {
        if unit.device != Device::DISK {
            unit.device = Device::CPU;
        }
    }
    assert!(streamed_only.computes_on_gpu());
    streamed_only.stream_device = Device::CPU;
    assert!(!streamed_only.computes_on_gpu());
    // The GPU keeps room for two disk blocks (bf16: 2 * (2*8192^2 + 2*1024*8192 + 3*8192*28672 + 2*8192) = 1,711,308,800 bytes each) and their KV caches.
    let block = 1_711_308_800u64;
    assert_eq!(c.units[1].bytes, block);
    let disk_blocks = p
        .units
        .iter()
        .filter(|u| u.device == Device::DISK && matches!(u.kind, UnitKind::Block(_)))
        .count() as u64;
    let gpu = p.usage(Device::cuda(0)).expect("gpu");
    assert!(
        gpu.reserve >= 2 * block + disk_blocks * c.reserve.kv_per_block,
        "{gpu:?}"
    );
    assert_eq!(
        p.streamed_bytes_per_forward,
        p.usage(Device::DISK).expect("disk").weights
    );

    // With disk limited to 20 GB, it cannot fit: the error says by how much, and where.
    let limited = case(
        &shape,
        &machine(&[80], 32),
        serde_json::json!({"disk": "20GB"}),
        1,
        4096,
    );
    let err = run(&limited, "auto").expect_err("does not fit");
    let text = err.to_string();
    assert!(
        text.contains("does not fit") && text.contains("cuda:0 has") && text.contains("cpu has"),
        "{text}"
    );
    assert!(text.contains("max_memory"), "suggests the knob: {text}");
}

#[test]
fn balanced_strategies_on_two_gpus() {
    let shape = shape_from(include_str!("../../../shared/refs/smollm2_config.json"));
    let c = case(
        &shape,
        &machine(&[16, 16], 64),
        serde_json::json!({}),
        1,
        2048,
    );

    let p = run(&c, "balanced").expect("fits");
    within_budgets(&p);
    // The two GPUs carry the same load, give or take a block (weights + KV + activations).
    let load = |d: Device| p.usage(d).map(|u| u.weights + u.reserve).expect("usage");
    let block = c.units[1].bytes + c.reserve.kv_per_block;
    let (a, b) = (load(Device::cuda(0)), load(Device::cuda(1)));
    assert!(a.abs_diff(b) <= 2 * block, "balanced: {a} vs {b} bytes");
    assert!(on(&p, Device::cuda(1)).len() > 10);

    let p = run(&c, "balanced_low_0").expect("fits");
    assert_eq!(
        on(&p, Device::cuda(0)),
        ["model.embed_tokens"],
        "GPU 0 keeps only the embeddings"
    );
    assert_eq!(on(&p, Device::cuda(1)).len(), 31);

    let p = run(&c, "sequential").expect("fits");
    assert_eq!(
        on(&p, Device::cuda(0)).len(),
        32,
        "sequential fills GPU 0 first"
    );

    let p = run(&c, "0:16;1:14").expect("fits");
    assert_eq!(p.device_of("model.layers.15"), Some(Device::cuda(0)));
    assert_eq!(p.device_of("model.layers.16"), Some(Device::cuda(1)));
    assert_eq!(p.device_of("model.norm"), Some(Device::cuda(1)));
    assert_eq!(p.device_of("model.embed_tokens"), Some(Device::cuda(0)));
    let p = run(&c, "0:10").expect("fits");
    assert_eq!(
        p.device_of("model.layers.10"),
        Some(Device::CPU),
        "blocks past the counts go to the CPU"
    );
}

#[test]
fn explicit_maps_must_name_real_whole_units_and_cover_them_all() {
    let shape = shape_from(include_str!("../../../shared/refs/smollm2_config.json"));
    let c = case(&shape, &machine(&[16], 64), serde_json::json!({}), 1, 512);
    let explicit = |map: serde_json::Value| plan_with(&c, map);
    let p = explicit(serde_json::json!({"model.embed_tokens": 0, "model.layers": "cpu", "model.layers.29": "disk", "model.norm": "cpu"}))
        .expect("valid");
    assert_eq!(p.device_of("model.layers.3"), Some(Device::CPU));
    assert_eq!(p.device_of("model.layers.29"), Some(Device::DISK));
    assert_eq!(p.device_of("model.embed_tokens"), Some(Device::cuda(0)));

    let err = explicit(serde_json::json!({"": "cpu", "model.decoder": 0})).expect_err("unknown");
    assert_eq!(
        err,
        PlanError::UnknownPrefix {
            prefixes: vec!["model.decoder".into()]
        }
    );
    let err = explicit(serde_json::json!({"model.embed_tokens": "cpu", "model.layers": "cpu"}))
        .expect_err("uncovered");
    assert_eq!(
        err,
        PlanError::Uncovered {
            units: vec!["model.norm".into()]
        }
    );
    let err =
        explicit(serde_json::json!({"": "cpu", "model.layers.3.mlp": 0})).expect_err("inside");
    assert!(err.to_string().contains("model.layers.3"), "{err}");
    let err = explicit(serde_json::json!({"": "cpu", "lm_head": 0})).expect_err("tied");
    assert!(err.to_string().contains("tied"), "{err}");
    let err = explicit(serde_json::json!({"": "cuda:3"})).expect_err("no such GPU");
    assert!(err.to_string().contains("cuda:3"), "{err}");
    let err = explicit(serde_json::json!({"": "cpu"})).and_then(|_| {
        let small = case(
            &shape,
            &machine(&[16], 64),
            serde_json::json!({"cpu": "100MB"}),
            1,
            512,
        );
        let strategy = Strategy::Single(Device::CPU);
        plan(&PlanRequest {
            units: &small.units,
            budgets: &small.budgets,
            strategy: &strategy,
            reserve: small.reserve,
            disk: DiskAccess::Mapped,
        })
    });
    assert!(matches!(err, Err(PlanError::DoesNotFit { .. })), "{err:?}");
}

#[test]
fn disk_offload_of_unmappable_weights_needs_an_offload_folder() {
    let shape = shape_from(include_str!("../../../shared/refs/smollm2_config.json"));
    let c = case(
        &shape,
        &machine(&[], 64),
        serde_json::json!({"cpu": "200MB"}),
        1,
        512,
    );
    let strategy = Strategy::Auto;
    let err = plan(&PlanRequest {
        units: &c.units,
        budgets: &c.budgets,
        strategy: &strategy,
        reserve: c.reserve,
        disk: DiskAccess::NeedsOffloadFolder(
            "the weights are converted from float32 to bfloat16".into(),
        ),
    })
    .expect_err("needs a folder");
    assert!(err.to_string().contains("offload_folder"), "{err}");
}

/// Mixtral-8x7B in bf16 (93 GB) with 30 GiB of RAM: llama.cpp users keep attention in
/// memory and the experts on disk (`-ot exps=CPU` / `--cpu-moe`). One wildcard entry says
/// so; layer counts carry a block's experts with it; an entry inside a block's MoE
/// that is not its experts is refused.
#[test]
fn experts_are_placed_apart_from_their_blocks() {
    let shape = shape_from(
        r#"{"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 32000, "max_position_embeddings": 32768, "num_local_experts": 8,
            "num_experts_per_tok": 2, "tie_word_embeddings": false, "torch_dtype": "bfloat16"}"#,
    );
    let c = case(
        &shape,
        &machine(&[], 64),
        serde_json::json!({"cpu": "30GiB"}),
        1,
        512,
    );
    let experts: Vec<&PlacementUnit> = c
        .units
        .iter()
        .filter(|u| matches!(u.kind, UnitKind::Experts(_)))
        .collect();
    assert_eq!(experts.len(), 32);
    assert_eq!(experts[0].name, "model.layers.0.block_sparse_moe.experts");
    assert_eq!(experts[0].bytes, 8 * 3 * 4096 * 14336 * 2);
    let explicit = |map: serde_json::Value| plan_with(&c, map);
    let p =
        explicit(serde_json::json!({"": "cpu", "model.layers.*.block_sparse_moe.experts": "disk"}))
            .expect("attention in RAM, experts on disk");
    within_budgets(&p);
    assert_eq!(p.device_of("model.layers.7"), Some(Device::CPU));
    assert_eq!(
        p.device_of("model.layers.7.block_sparse_moe.experts"),
        Some(Device::DISK)
    );
    assert_eq!(on(&p, Device::DISK).len(), 32);
    assert!(
        p.notes
            .iter()
            .any(|n| n.starts_with("32 blocks' experts on disk are read on demand")),
        "{:?}",
        p.notes
    );
    let table = explain::table(&p);
    assert!(
        table.contains("model.layers.0..31 (32 blocks)")
            && table.contains("model.layers.0..31.block_sparse_moe.experts (32 blocks' experts)"),
        "{table}"
    );
    // The whole model does not fit the 30 GiB: experts in RAM are refused.
    assert!(matches!(
        explicit(serde_json::json!({"": "cpu"})),
        Err(PlanError::DoesNotFit { .. })
    ));
    let err = explicit(serde_json::json!({"": "cpu", "model.layers.3.block_sparse_moe": "disk"}))
        .expect_err("the router is inside block 3");
    assert!(
        err.to_string().contains("inside the unit `model.layers.3`"),
        "{err}"
    );
    // A wildcard entry inside every block, but not naming their experts, is refused too.
    for entry in [
        "model.layers.*.block_sparse_moe",
        "model.layers.*.self_attn",
    ] {
        let err = explicit(serde_json::json!({"": "cpu", entry: "disk"})).expect_err(entry);
        assert!(
            err.to_string()
                .contains("is inside the unit `model.layers."),
            "{err}"
        );
    }
    let err = explicit(
        serde_json::json!({"": "cpu", "model.layers.3.block_sparse_moe.experts.1": "disk"}),
    )
    .expect_err("one expert is inside the experts unit");
    assert!(
        err.to_string().contains("block_sparse_moe.experts`"),
        "{err}"
    );
    let gpu = case(&shape, &machine(&[80], 200), serde_json::json!({}), 1, 512);
    let counts = run(&gpu, "0:4").expect("four blocks on the GPU");
    for (i, device) in [(3, Device::cuda(0)), (4, Device::CPU)] {
        assert_eq!(counts.device_of(&format!("model.layers.{i}")), Some(device));
        assert_eq!(
            counts.device_of(&format!("model.layers.{i}.block_sparse_moe.experts")),
            Some(device)
        );
    }
}

/// Balanced over two GPUs, a GPU's share may overshoot by one block *with its experts*:
/// with the experts a unit of their own, the overshoot of a bare block (a twelfth of a
/// Mixtral block's bytes) stopped GPU 0 an experts unit short and pushed the head off
/// the GPUs.
#[test]
fn balanced_shares_overshoot_by_a_block_with_its_experts() {
    let gib = |x: f64| (x * GIB as f64) as u64;
    let unit = |name: String, bytes, kind| PlacementUnit {
        name,
        bytes,
        kind,
        tied: vec![],
    };
    let mut units = vec![unit("model.embed_tokens".into(), gib(0.8), UnitKind::Pre)];
    for i in 0..7 {
        units.push(unit(
            format!("model.layers.{i}"),
            gib(0.25),
            UnitKind::Block(i),
        ));
        units.push(unit(
            format!("model.layers.{i}.block_sparse_moe.experts"),
            gib(2.0),
            UnitKind::Experts(i),
        ));
    }
    units.push(unit("lm_head".into(), gib(1.45), UnitKind::Post));
    let budget = |device, bytes| DeviceBudget { device, bytes };
    let budgets = Budgets {
        devices: vec![
            budget(Device::cuda(0), Some(10 * GIB)),
            budget(Device::cuda(1), Some(10 * GIB)),
            budget(Device::CPU, Some(64 * GIB)),
            budget(Device::DISK, None),
        ],
        notes: vec![],
    };
    let p = plan(&PlanRequest {
        units: &units,
        budgets: &budgets,
        strategy: &Strategy::Balanced,
        reserve: Reserve::default(),
        disk: DiskAccess::Mapped,
    })
    .expect("18 GiB on two 10 GiB GPUs");
    within_budgets(&p);
    assert!(
        p.units.iter().all(|u| u.device.kind == DeviceType::Cuda),
        "{}",
        explain::table(&p)
    );
}

/// `plan`'s table folds consecutive blocks' experts, and a dense block between them
/// (Qwen 3 MoE's `mlp_only_layers`) ends a line rather than hiding in a range.
#[test]
fn the_plan_table_folds_experts_only_over_consecutive_blocks() {
    let unit = |name: String, kind| PlacementUnit {
        name,
        bytes: 1 << 20,
        kind,
        tied: vec![],
    };
    let mut units = vec![unit("model.embed_tokens".into(), UnitKind::Pre)];
    for i in 0..4 {
        units.push(unit(format!("model.layers.{i}"), UnitKind::Block(i)));
        if i != 1 {
            units.push(unit(
                format!("model.layers.{i}.mlp.experts"),
                UnitKind::Experts(i),
            ));
        }
    }
    let budgets = Budgets {
        devices: vec![
            DeviceBudget {
                device: Device::CPU,
                bytes: None,
            },
            DeviceBudget {
                device: Device::DISK,
                bytes: None,
            },
        ],
        notes: vec![],
    };
    let p = plan(&PlanRequest {
        units: &units,
        budgets: &budgets,
        strategy: &Strategy::Single(Device::CPU),
        reserve: Reserve::default(),
        disk: DiskAccess::Mapped,
    })
    .expect("plan");
    let table = explain::table(&p);
    let names: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split("  ").next())
        .map(str::trim)
        .filter(|n| n.starts_with("model.layers"))
        .collect();
    assert_eq!(
        names,
        [
            "model.layers.0..3 (4 blocks)",
            "model.layers.0.mlp.experts",
            "model.layers.2..3.mlp.experts (2 blocks' experts)"
        ],
        "{table}"
    );
}
