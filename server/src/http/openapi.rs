//! The API descriptions TorchServe answers `OPTIONS /` (and `GET /api-description`)
//! with: an OpenAPI 3.0.1 document per API, listing every endpoint, its parameters
//! and its answers. Built from one table per API, so a route added here is described.

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Map, Value, json};

/// Which API a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Inference,
    Management,
}

/// An endpoint: method, path, what it does, and its query or path parameters.
struct Endpoint {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    parameters: &'static [&'static str],
}

const fn endpoint(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    parameters: &'static [&'static str],
) -> Endpoint {
    Endpoint {
        method,
        path,
        summary,
        parameters,
    }
}

/// Both APIs describe themselves.
const SELF_DESCRIPTION: &[Endpoint] = &[
    endpoint("options", "/", "This API's description (OpenAPI).", &[]),
    endpoint(
        "get",
        "/api-description",
        "This API's description (OpenAPI).",
        &[],
    ),
];

const INFERENCE: &[Endpoint] = &[
    endpoint(
        "get",
        "/ping",
        "Health: Healthy once the start-up models are loaded.",
        &[],
    ),
    endpoint(
        "post",
        "/predictions/{model_name}",
        "A prediction from the model's default version.",
        &["model_name"],
    ),
    endpoint(
        "put",
        "/predictions/{model_name}",
        "A prediction from the model's default version, the body uploaded as curl -T sends it (an image).",
        &["model_name"],
    ),
    endpoint(
        "post",
        "/predictions/{model_name}/{model_version}",
        "A prediction from one version.",
        &["model_name", "model_version"],
    ),
    endpoint(
        "put",
        "/predictions/{model_name}/{model_version}",
        "A prediction from one version, the body uploaded as curl -T sends it.",
        &["model_name", "model_version"],
    ),
    endpoint("get", "/v1/models", "OpenAI: the registered models.", &[]),
    endpoint("post", "/v1/embeddings", "OpenAI: embeddings.", &[]),
    endpoint(
        "post",
        "/v1/completions",
        "OpenAI: a text completion (streams with stream: true).",
        &[],
    ),
    endpoint(
        "post",
        "/v1/chat/completions",
        "OpenAI: a chat completion (streams with stream: true).",
        &[],
    ),
    endpoint(
        "post",
        "/rerank",
        "text-embeddings-inference's rerank: passages scored by a cross-encoder.",
        &[],
    ),
    endpoint(
        "post",
        "/v1/rerank",
        "Rerank as vLLM's, Jina's and Cohere's clients send it.",
        &[],
    ),
    endpoint("get", "/v2", "KServe v2: server metadata.", &[]),
    endpoint("get", "/v2/health/live", "KServe v2: liveness.", &[]),
    endpoint("get", "/v2/health/ready", "KServe v2: readiness.", &[]),
    endpoint(
        "get",
        "/v2/models/{model_name}",
        "KServe v2: model metadata.",
        &["model_name"],
    ),
    endpoint(
        "get",
        "/v2/models/{model_name}/versions/{model_version}",
        "KServe v2: model metadata.",
        &["model_name", "model_version"],
    ),
    endpoint(
        "get",
        "/v2/models/{model_name}/ready",
        "KServe v2: model readiness.",
        &["model_name"],
    ),
    endpoint(
        "get",
        "/v2/models/{model_name}/versions/{model_version}/ready",
        "KServe v2: model readiness.",
        &["model_name", "model_version"],
    ),
    endpoint(
        "post",
        "/v2/models/{model_name}/infer",
        "KServe v2: inference.",
        &["model_name"],
    ),
    endpoint(
        "post",
        "/v2/models/{model_name}/versions/{model_version}/infer",
        "KServe v2: inference.",
        &["model_name", "model_version"],
    ),
];

const MANAGEMENT: &[Endpoint] = &[
    endpoint(
        "get",
        "/",
        "The status page (HTML): models, placements, devices.",
        &[],
    ),
    endpoint(
        "get",
        "/models",
        "The registered models, paged.",
        &["limit", "next_page_token"],
    ),
    endpoint(
        "post",
        "/models",
        "Registers a model archive from the model store.",
        &[
            "url",
            "model_name",
            "handler",
            "runtime",
            "batch_size",
            "max_batch_delay",
            "initial_workers",
            "synchronous",
            "response_timeout",
        ],
    ),
    endpoint(
        "get",
        "/models/{model_name}",
        "Describes the model's default version.",
        &["model_name"],
    ),
    endpoint(
        "get",
        "/models/{model_name}/{model_version}",
        "Describes a version (or all).",
        &["model_name", "model_version"],
    ),
    endpoint(
        "put",
        "/models/{model_name}",
        "Scales the model's workers.",
        &["model_name", "min_worker", "max_worker", "synchronous"],
    ),
    endpoint(
        "put",
        "/models/{model_name}/{model_version}",
        "Scales a version's workers.",
        &[
            "model_name",
            "model_version",
            "min_worker",
            "max_worker",
            "synchronous",
        ],
    ),
    endpoint(
        "delete",
        "/models/{model_name}",
        "Unregisters every version.",
        &["model_name"],
    ),
    endpoint(
        "delete",
        "/models/{model_name}/{model_version}",
        "Unregisters a version.",
        &["model_name", "model_version"],
    ),
    endpoint(
        "put",
        "/models/{model_name}/{model_version}/set-default",
        "Makes a version the default.",
        &["model_name", "model_version"],
    ),
    endpoint("get", "/devices", "The device manager's pools.", &[]),
];

/// The OpenAPI document for `api`.
pub fn description(api: Api) -> Value {
    let (title, endpoints) = match api {
        Api::Inference => ("Spillway inference API", INFERENCE),
        Api::Management => ("Spillway management API", MANAGEMENT),
    };
    let mut paths = Map::new();
    for e in SELF_DESCRIPTION.iter().chain(endpoints) {
        let parameters: Vec<Value> = e
            .parameters
            .iter()
            .map(|name| {
                let in_path = e.path.contains(&format!("{{{name}}}"));
                json!({
                    "name": name,
                    "in": if in_path { "path" } else { "query" },
                    "required": in_path || (*name == "url"),
                    "schema": {"type": "string"},
                })
            })
            .collect();
        let operation = json!({
            "summary": e.summary,
            "parameters": parameters,
            "responses": {
                "200": {"description": "OK"},
                "default": {"description": "An error, as JSON"},
            },
        });
        let entry = paths
            .entry(e.path)
            .or_insert_with(|| Value::Object(Map::new()));
        entry[e.method] = operation;
    }
    json!({
        "openapi": "3.0.1",
        "info": {"title": title, "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
    })
}

/// `OPTIONS /` and `GET /api-description` for `api`; `root` serves the other methods of
/// `/` (the management API's status page).
pub fn router(api: Api, root: axum::routing::MethodRouter) -> Router {
    let answer = move || async move { axum::Json(description(api)).into_response() };
    Router::new()
        .route("/", root.options(answer))
        .route("/api-description", get(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_describes_its_own_endpoints() {
        let inference = description(Api::Inference);
        assert_eq!(inference["openapi"], "3.0.1");
        let post = &inference["paths"]["/predictions/{model_name}"]["post"];
        assert_eq!(post["parameters"][0]["in"], "path");
        assert!(inference["paths"]["/predictions/{model_name}"]["put"].is_object());
        assert!(inference["paths"]["/v1/chat/completions"]["post"].is_object());
        assert!(inference["paths"]["/v1/rerank"]["post"].is_object());
        assert!(inference["paths"].get("/models").is_none());
        let management = description(Api::Management);
        let register = &management["paths"]["/models"]["post"]["parameters"];
        let url = register
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "url"));
        assert_eq!(
            url.map(|u| (&u["in"], &u["required"])),
            Some((&json!("query"), &json!(true)))
        );
        // Two methods on one path keep both.
        let models = &management["paths"]["/models"];
        assert!(models["get"].is_object() && models["post"].is_object());
    }
}
