//! `multipart/form-data` bodies, as TorchServe's frontend reads them: each part is a
//! named input (`curl -F "data=@kitten.jpg"` sends the image as the part `data`). The
//! form is parsed by `multer` from the body already read (within `max_request_size`).

use spillway_handlers::RawBody;

use crate::error::{Error, Result};

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub content_type: Option<String>,
    pub bytes: Vec<u8>,
}

/// The parts of `body` when it is declared `multipart/form-data`; `None` otherwise.
pub async fn parts(body: &RawBody) -> Result<Option<Vec<Part>>> {
    let Some(content_type) = body.content_type.as_deref() else {
        return Ok(None);
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return Ok(None);
    }
    let bad =
        |e: multer::Error| Error::BadRequest(format!("malformed multipart/form-data body: {e}"));
    let boundary = multer::parse_boundary(content_type).map_err(bad)?;
    let bytes = axum::body::Bytes::from(body.bytes.clone());
    let stream =
        futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        let content_type = field.content_type().map(|m| m.to_string());
        let bytes = field.bytes().await.map_err(bad)?.to_vec();
        parts.push(Part {
            name,
            content_type,
            bytes,
        });
    }
    Ok(Some(parts))
}

/// The parts a handler reads: those named `data` or `body` (TorchServe's handlers read
/// `data` first, then `body`), else every part.
pub fn inputs(parts: Vec<Part>) -> Result<Vec<Part>> {
    if parts.is_empty() {
        return Err(Error::BadRequest(
            "the multipart/form-data body has no parts".into(),
        ));
    }
    let named: Vec<Part> = parts
        .iter()
        .filter(|p| p.name == "data" || p.name == "body")
        .cloned()
        .collect();
    Ok(if named.is_empty() { parts } else { named })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &[u8])]) -> RawBody {
        let mut bytes = Vec::new();
        for (name, data) in parts {
            bytes.extend_from_slice(
                format!(
                    "--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"
                )
                .as_bytes(),
            );
            bytes.extend_from_slice(data);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"--XyZ--\r\n");
        RawBody {
            content_type: Some("multipart/form-data; boundary=XyZ".into()),
            bytes,
        }
    }

    #[tokio::test]
    async fn a_form_yields_its_named_parts_with_their_bytes() {
        let body = form(&[("other", b"x"), ("data", b"\xff\xd8\x00\r\nbinary")]);
        let found =
            inputs(parts(&body).await.expect("parsed").expect("multipart")).expect("inputs");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].bytes, b"\xff\xd8\x00\r\nbinary");
        assert_eq!(found[0].content_type.as_deref(), Some("image/jpeg"));
        let json = RawBody {
            content_type: Some("application/json".into()),
            bytes: b"{}".to_vec(),
        };
        assert_eq!(parts(&json).await.expect("not a form"), None);
        let broken = RawBody {
            content_type: Some("multipart/form-data; boundary=XyZ".into()),
            bytes: b"--XyZ\r\nno end".to_vec(),
        };
        assert!(matches!(parts(&broken).await, Err(Error::BadRequest(_))));
    }
}
