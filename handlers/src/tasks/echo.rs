//! The `echo` handler: answers each request with its own body. It has no model, so it
//! measures the server itself (HTTP, queue, batcher, workers).

use crate::{Handler, HandlerError, HandlerInfo, HandlerKind, Input, Output, Request};

/// Returns its input unchanged.
#[derive(Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
        match request {
            Request::Raw(body) => Ok(Input::Raw(body)),
            _ => Err(HandlerError::Input("echo takes raw bodies".into())),
        }
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        Ok(batch
            .iter()
            .map(|input| match input {
                Input::Raw(body) => Ok(Output::Raw(body.clone())),
                _ => Err(HandlerError::Input("echo takes raw bodies".into())),
            })
            .collect())
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            handler: HandlerKind::Echo,
            architecture: None,
            dtype: None,
            device: "cpu".into(),
            max_input_tokens: None,
            streamed_units: None,
            parameters: None,
            weights: None,
        }
    }
}
