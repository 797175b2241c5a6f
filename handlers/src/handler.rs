//! The [`Handler`] trait and the types that cross it. Handlers speak types; each
//! protocol's JSON lives in the server (`server/src/http/<protocol>`).
//!
//! A protocol turns its body into a [`Request`]. [`Handler::prepare`] checks and
//! tokenizes it, once, into an [`Input`] (CPU work: the server calls it off the async
//! runtime), so one bad request never fails the batch it would have joined and a token
//! budget can size it. [`Handler::run`] then runs a whole batch of inputs on a worker
//! thread and answers each with an [`Output`]. A generation input may carry an
//! [`EventSender`]: its tokens are then streamed as they are generated.

use candle_core::{DType, Device};
use serde::Serialize;
use tokenizers::Encoding;

use crate::HandlerError;
use crate::chat::ChatRequest;
use crate::generate::{EventSender, GenerateParameters, GenerateRequest, Generation};
use crate::weights::layer_stack::Units;

/// A request body as it arrived (what the echo handler answers with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBody {
    pub content_type: Option<String>,
    pub bytes: Vec<u8>,
}

/// A request in a handler's terms, whatever protocol it came by.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// One or more texts (the text handlers).
    Texts(Vec<String>),
    /// One or more (text, text pair) inputs, encoded together as one sequence: a
    /// cross-encoder's (query, passage) or a classifier's sentence pair.
    Pairs(Vec<(String, String)>),
    /// One or more texts already tokenized by the model's own tokenizer (the text
    /// handlers take the ids as they are: no special tokens are added).
    Tokens(Vec<Vec<u32>>),
    /// A prompt and generation parameters (text_generation).
    Generate(GenerateRequest),
    /// A conversation, rendered by the model's chat template (text_generation).
    Chat(ChatRequest),
    /// One or more encoded images (JPEG, PNG, ...), as sent (image_classifier).
    Images(Vec<Vec<u8>>),
    /// The body as it came (the echo handler).
    Raw(RawBody),
}

impl Request {
    /// Whether preparing it tokenizes or decodes (work to keep off the async runtime).
    pub fn tokenizes(&self) -> bool {
        !matches!(self, Request::Raw(_))
    }
}

/// A request checked and tokenized by [`Handler::prepare`], ready to queue and batch.
#[derive(Debug, Clone)]
pub enum Input {
    /// Texts, each tokenized (truncated at the model's input limit).
    Texts(Vec<Encoding>),
    /// A tokenized prompt.
    Prompt(Box<PromptInput>),
    /// Images decoded and preprocessed into model inputs.
    Images(Vec<ImageInput>),
    /// The body as it came.
    Raw(RawBody),
}

/// One image as the model takes it: `[3, height, width]` floats, channel-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f32>,
}

/// A tokenized prompt, its parameters, and where to stream its tokens.
#[derive(Debug, Clone)]
pub struct PromptInput {
    pub ids: Vec<u32>,
    pub parameters: GenerateParameters,
    pub events: Option<EventSender>,
    /// The grammar of `parameters`, compiled against the model's vocabulary.
    pub constraint: Option<crate::sampling::TokenConstraint>,
}

impl Input {
    /// How much of a padded batch it takes, where tokens are what a batch's cost grows
    /// with (texts: `rows` texts of up to `tokens` tokens); `None` otherwise.
    pub fn size(&self) -> Option<InputSize> {
        match self {
            Input::Texts(encodings) => Some(InputSize {
                rows: encodings.len(),
                tokens: encodings.iter().map(Encoding::len).max().unwrap_or(0),
            }),
            Input::Prompt(_) | Input::Images(_) | Input::Raw(_) => None,
        }
    }

    /// How many tokens it holds (every text's, or the prompt's), for usage reports.
    pub fn tokens(&self) -> usize {
        match self {
            Input::Texts(encodings) => encodings.iter().map(Encoding::len).sum(),
            Input::Prompt(prompt) => prompt.ids.len(),
            Input::Images(_) | Input::Raw(_) => 0,
        }
    }

    /// Streams a prompt's tokens to `events` as they are generated. False (and nothing
    /// changes) for inputs that do not generate.
    pub fn stream_to(&mut self, events: EventSender) -> bool {
        match self {
            Input::Prompt(prompt) => {
                prompt.events = Some(events);
                true
            }
            Input::Texts(_) | Input::Images(_) | Input::Raw(_) => false,
        }
    }
}

/// How much of a padded batch one input takes: `rows` sequences of up to `tokens`
/// tokens each (what a token budget counts; see [`Input::size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSize {
    pub rows: usize,
    pub tokens: usize,
}

/// One request's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// One embedding per input text.
    Embeddings(Vec<Vec<f32>>),
    /// The best label per input text.
    Classifications(Vec<Classification>),
    /// The entities found in each input text.
    Entities(Vec<Vec<Entity>>),
    /// The most likely labels of each input image, most likely first.
    Labels(Vec<Vec<ScoredLabel>>),
    /// A finished generation.
    Generation(Generation),
    /// Bytes to send back as they are.
    Raw(RawBody),
}

/// A text's most likely label and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub label: String,
    pub score: f32,
    /// That label's logit, before the softmax or sigmoid (a reranker's raw score).
    pub logit: f32,
}

/// A label and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredLabel {
    pub label: String,
    pub probability: f32,
}

/// A run of tokens labelled as one entity, as transformers' token-classification
/// pipeline with `aggregation_strategy="simple"` reports it: the label without its
/// `B-`/`I-` prefix, the tokens' mean probability, their text, and its character span.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub entity_group: String,
    pub score: f32,
    pub word: String,
    pub start: usize,
    pub end: usize,
}

/// The built-in handlers, by the name used in archives (`--handler text_embedding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    TextEmbedding,
    TextClassification,
    TokenClassification,
    TextGeneration,
    ImageClassifier,
    Echo,
}

impl HandlerKind {
    pub const ALL: [HandlerKind; 6] = [
        HandlerKind::TextEmbedding,
        HandlerKind::TextClassification,
        HandlerKind::TokenClassification,
        HandlerKind::TextGeneration,
        HandlerKind::ImageClassifier,
        HandlerKind::Echo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandlerKind::TextEmbedding => "text_embedding",
            HandlerKind::TextGeneration => "text_generation",
            HandlerKind::TextClassification => "text_classification",
            HandlerKind::TokenClassification => "token_classification",
            HandlerKind::ImageClassifier => "image_classifier",
            HandlerKind::Echo => "echo",
        }
    }

    /// Whether the handler needs model files (weights, config, tokenizer).
    pub fn needs_model_files(self) -> bool {
        !matches!(self, HandlerKind::Echo)
    }
}

impl std::fmt::Display for HandlerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for HandlerKind {
    type Err = HandlerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HandlerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = HandlerKind::ALL.iter().map(|k| k.name()).collect();
                HandlerError::Unsupported(format!(
                    "unknown handler `{s}`; the built-in handlers are: {}",
                    known.join(", ")
                ))
            })
    }
}

/// What a handler is told at load time, from the model's setup_config.json.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the model runs.
    pub device: Device,
    /// The dtype to run in; `None` means the checkpoint's own (`torch_dtype: "auto"`).
    pub dtype: Option<DType>,
    /// Longest input in tokens; longer inputs are truncated. `None`: the model's own limit.
    pub max_length: Option<usize>,
    /// Where each unit lives; `None`: everything resident on `device`.
    pub plan: Option<spillway_placement::Plan>,
    /// model-config.yaml's `handler:` section (TorchServe's handler settings), e.g.
    /// image_classifier's `topk`.
    pub handler_config: serde_json::Map<String, serde_json::Value>,
    /// Bytes a generator may keep of the keys and values of prompts it has seen, for
    /// later prompts that start the same way (0: none).
    pub prefix_cache_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            max_length: None,
            plan: None,
            handler_config: serde_json::Map::new(),
            prefix_cache_bytes: 0,
        }
    }
}

impl LoadOptions {
    /// Where the unit `name` lives at run time, from the plan. Disk units run on the
    /// plan's stream device. A unit on `cuda:N` runs on [`crate::gpu::device`] (an error
    /// that says why in a build or on a host without GPUs).
    pub fn placement_of(
        &self,
        name: &str,
    ) -> Result<crate::weights::layer_stack::UnitPlacement, HandlerError> {
        use crate::weights::layer_stack::UnitPlacement;
        use spillway_placement::DeviceType;
        let Some(plan) = &self.plan else {
            return Ok(UnitPlacement::Resident(self.device.clone()));
        };
        let device = plan.device_of(name).ok_or_else(|| {
            HandlerError::Unsupported(format!("the placement plan has no unit `{name}`"))
        })?;
        let candle_device = |d: spillway_placement::Device| match d.kind {
            DeviceType::Cpu | DeviceType::Disk => Ok(Device::Cpu),
            DeviceType::Cuda => crate::gpu::device(d.ordinal).map_err(|e| {
                HandlerError::Unsupported(format!("`{name}` is planned on {d}, but {e}"))
            }),
            DeviceType::Metal => Err(HandlerError::Unsupported(format!(
                "`{name}` is planned on {d}, but Spillway has no Metal backend"
            ))),
        };
        Ok(match device.kind {
            DeviceType::Disk => UnitPlacement::Streamed(candle_device(plan.stream_device)?),
            _ => UnitPlacement::Resident(candle_device(device)?),
        })
    }
}

/// The candle dtype a model runs in for a floating-point checkpoint dtype (`None` for
/// those handlers do not run in: integers, float8).
pub fn candle_dtype(dtype: spillway_placement::TensorDType) -> Option<DType> {
    use spillway_placement::TensorDType;
    match dtype {
        TensorDType::F32 => Some(DType::F32),
        TensorDType::F16 => Some(DType::F16),
        TensorDType::BF16 => Some(DType::BF16),
        TensorDType::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Describes a loaded handler (shown by the describe API).
#[derive(Debug, Clone, Serialize)]
pub struct HandlerInfo {
    pub handler: HandlerKind,
    /// Model family, e.g. "bert".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_input_tokens: Option<usize>,
    /// Units kept on disk and streamed for each forward pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_units: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<usize>,
    /// How the weights are held: GGML blocks used in place from the mapping or copied,
    /// float tensors copied (see [`crate::WeightSource::holding`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

/// A loaded model, shared by all of its workers.
pub trait Handler: Send + Sync {
    /// Checks a request and tokenizes it, once. CPU work that runs before queueing, off
    /// the async runtime; an error fails this request alone.
    fn prepare(&self, request: Request) -> Result<Input, HandlerError>;

    /// Runs a batch. `Ok` holds exactly one result per input, in order (an input can
    /// fail alone); `Err` means the whole batch failed.
    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError>;

    /// What this handler is.
    fn info(&self) -> HandlerInfo;

    /// Its model's units, for metrics and the device manager (`None` for a handler
    /// without a model: it cannot move anything to disk).
    fn units(&self) -> Option<&dyn Units> {
        None
    }

    /// Why the weights it serves from can no longer be trusted, if a file it still maps
    /// was truncated or rewritten underneath (see [`crate::WeightsWatch`]). The server
    /// asks after every batch and step, and before queueing: answers computed since the
    /// change are failed, and the model is loaded again from the file as it is now.
    fn weights_changed(&self) -> Option<HandlerError> {
        None
    }

    /// A fresh running batch for continuous batching, where the handler supports it
    /// (generation: requests join between steps and leave as they finish).
    fn step_batch(&self) -> Option<Box<dyn StepBatch + '_>> {
        None
    }

    /// What its prefix cache has done, where it keeps one (generation).
    fn prefix_cache(&self) -> Option<PrefixCacheTotals> {
        None
    }
}

/// A generator's prefix cache so far: prompt tokens looked up, those found (not
/// computed again), and the bytes it holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheTotals {
    pub lookup_tokens: u64,
    pub hit_tokens: u64,
    pub bytes: u64,
}

/// A request that left a [`StepBatch`]: its ticket and its answer.
pub type Finished = (u64, Result<Output, HandlerError>);

/// A batch that runs step by step (continuous batching): requests join it between steps
/// and leave it when they finish, so a short request never waits for a long one and a
/// new one never waits for the batch to drain. Tickets are the caller's request ids.
pub trait StepBatch: Send {
    /// Admits `input` and runs its first step (a prompt's prefill) now. `Some` when it is
    /// already finished (or failed, alone); `None` when it runs on in the batch.
    fn join(&mut self, ticket: u64, input: &Input) -> Option<Result<Output, HandlerError>>;

    /// Drops a running request (its client left).
    fn leave(&mut self, ticket: u64);

    /// Advances every running request by one step, together; returns those that
    /// finished. `Err` fails every running request (the batch is then empty).
    fn step(&mut self) -> Result<Vec<Finished>, HandlerError>;

    /// Requests still running.
    fn running(&self) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_names_round_trip_and_unknown_names_list_the_known_ones() {
        for kind in HandlerKind::ALL {
            assert_eq!(kind.name().parse::<HandlerKind>().ok(), Some(kind));
        }
        let err = "python_code".parse::<HandlerKind>().expect_err("unknown");
        assert!(err.to_string().contains("text_embedding"), "{err}");
    }

    /// A plan over GPU, CPU and disk maps unit by unit onto where each runs: CPU units
    /// resident on the CPU, disk units streamed to the plan's stream device (the GPU), GPU
    /// units on that GPU, which a build or host without one refuses, naming the unit.
    #[test]
    fn a_gpu_plan_maps_each_unit_to_where_it_runs() {
        use crate::weights::layer_stack::UnitPlacement;
        use spillway_placement::{Device as Placed, PlacedUnit, Plan, UnitKind};
        let unit = |name: &str, device: Placed| PlacedUnit {
            name: name.into(),
            bytes: 1,
            device,
            kind: UnitKind::Post,
            tied: vec![],
        };
        let plan = Plan {
            strategy: "auto".into(),
            units: vec![
                unit("gpu_unit", Placed::cuda(0)),
                unit("cpu_unit", Placed::CPU),
                unit("disk_unit", Placed::DISK),
            ],
            devices: vec![],
            stream_device: Placed::cuda(0),
            streamed_bytes_per_forward: 1,
            notes: vec![],
        };
        let options = LoadOptions {
            plan: Some(plan),
            ..LoadOptions::default()
        };
        assert!(matches!(
            options.placement_of("cpu_unit"),
            Ok(UnitPlacement::Resident(Device::Cpu))
        ));
        assert!(options.placement_of("no_such_unit").is_err());
        match crate::gpu::device(0) {
            Ok(gpu) => {
                for name in ["gpu_unit", "disk_unit"] {
                    let placed = options.placement_of(name).expect("a GPU is here");
                    let (UnitPlacement::Resident(d) | UnitPlacement::Streamed(d)) = &placed;
                    assert!(d.same_device(&gpu), "{name} runs on cuda:0");
                    assert_eq!(
                        matches!(placed, UnitPlacement::Streamed(_)),
                        name == "disk_unit"
                    );
                }
            }
            Err(why) => {
                for name in ["gpu_unit", "disk_unit"] {
                    let err = options.placement_of(name).expect_err("no GPU here");
                    let message = err.to_string();
                    assert!(
                        message.contains(name) && message.contains("cuda:0"),
                        "{message}"
                    );
                    assert!(message.contains(&why.to_string()), "{message}");
                }
            }
        }
    }
}
