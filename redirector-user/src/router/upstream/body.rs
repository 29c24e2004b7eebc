//! The body of an upstream response, holding its stream's slot on the upstream connection
//! (HTTP/2) or the connection itself (HTTP/1.1) until the body ends or is dropped.
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{h1::Lease, h2::StreamPermit};

pub struct UpstreamBody {
    inner: Incoming,
    permit: Option<StreamPermit>,
    lease: Option<Lease>,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, permit: Option<StreamPermit>) -> UpstreamBody {
        UpstreamBody {
            inner,
            permit,
            lease: None,
        }
    }

    pub(super) fn leased(inner: Incoming, lease: Lease) -> UpstreamBody {
        UpstreamBody {
            inner,
            permit: None,
            lease: Some(lease),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // The exchange is over: the slot (or connection) is free before the server gets
            // round to dropping the body.
            self.permit = None;
            self.lease = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
