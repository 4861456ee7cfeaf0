//! The floor under the agent's start-up: the API server answering the
//! agent's paged list of the node's pods, with nothing decoded.

use std::time::{Duration, Instant};

use imdsguard_testlab::{cluster::NODE, stats::median};
use kube::{api::ListParams, core::Request};
use serde::Deserialize;

use super::node::Node;

/// Just the list's continue token; the items are skipped.
#[derive(Deserialize)]
struct Page {
    metadata: PageMeta,
}

#[derive(Deserialize)]
struct PageMeta {
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

/// The median, over `repeats`, of the time the API server takes to send
/// every page of this node's pods (`spec.nodeName`, `page_size` a page),
/// as the agent asks for them; and the number of pages.
pub(super) fn api_list(
    node: &Node,
    page_size: u32,
    repeats: u32,
) -> anyhow::Result<(Duration, usize)> {
    let client = node.cluster.admin.clone();
    let (times, pages) = node.cluster.rt.block_on(async move {
        let mut times = Vec::new();
        let mut pages = 0;
        for _ in 0..repeats {
            let mut lp = ListParams::default()
                .fields(&format!("spec.nodeName={NODE}"))
                .limit(page_size);
            let mut waited = Duration::ZERO;
            pages = 0;
            loop {
                let request = Request::new("/api/v1/pods").list(&lp)?;
                let t0 = Instant::now();
                let text = client.request_text(request).await?;
                waited += t0.elapsed();
                pages += 1;
                let page: Page = serde_json::from_str(&text)?;
                match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                    Some(token) => lp = lp.continue_token(&token),
                    None => break,
                }
            }
            times.push(waited.as_secs_f64());
        }
        anyhow::Ok((times, pages))
    })?;
    Ok((Duration::from_secs_f64(median(times)), pages))
}
