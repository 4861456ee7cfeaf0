use super::*;

/// 410 Gone in the middle of a watch: the watcher relists, and the relist
/// replaces the whole store. Pod A's deletion happened while we could not
/// watch, so no DELETED event ever arrives for it; it is gone from the
/// store, and from the allow map, only because the relist replaces the
/// store and the reconciler recomputes from the full state.
#[tokio::test]
async fn gone_mid_watch_relists_and_drops_pods_deleted_unseen() {
    // A's cgroup directory is still there (kubelet may be slow to remove
    // it): only the store can make its entry go away.
    let tree = Kubepods::new("gone", &[&POD_A, &POD_B, &POD_C]);
    let mut p = Pipeline::start();

    let send = p.api.list().await;
    respond(send, StatusCode::OK, pod_list("1", &[&POD_A, &POD_B])).await;
    // The watcher asks for the watch only after the list is in the store.
    let send = p.api.watch("1").await;
    assert_eq!(names(&p.store), set(&["a", "b"]));
    p.reconciler_sees(&["a", "b"]).await;
    assert_eq!(tree.compute(&p.store), tree.entries(&[&POD_A, &POD_B]));
    assert_eq!(p.watch_errors(), 0);

    // The watch starts, then the server says our resourceVersion is too
    // old. The body stays open: the watcher must leave it by itself.
    let mut body = respond_open(send);
    write(&mut body, watch_event("ERROR", gone("1"))).await;

    // It relists (a LIST, not a new WATCH from "1").
    let send = p.api.list().await;
    assert_eq!(p.watch_errors(), 1, "the 410 must count as a watch error");
    assert_eq!(p.backoff_attempts(), [1], "the 410 must be backed off");
    // Until the relist completes the store keeps the last complete list.
    assert_eq!(names(&p.store), set(&["a", "b"]));
    let wakeups_before_relist = p.wakeups.load(Ordering::SeqCst);

    respond(send, StatusCode::OK, pod_list("5", &[&POD_B, &POD_C])).await;
    let _watch = p.api.watch("5").await;
    assert_eq!(names(&p.store), set(&["b", "c"]));
    p.reconciler_sees(&["b", "c"]).await;
    assert!(p.wakeups.load(Ordering::SeqCst) > wakeups_before_relist);
    assert_eq!(
        tree.compute(&p.store),
        tree.entries(&[&POD_B, &POD_C]),
        "the allow map must hold exactly the allowed pods of the relist"
    );
    assert_eq!(p.watch_errors(), 1);
    drop(body);
}

/// The watch connection drops in every way we know, then the API server is
/// down, then it is back but our resourceVersion has been compacted away
/// and the relist fails twice before it succeeds. Meanwhile the store (and
/// so enforcement) keeps the last complete state; every failure is counted
/// and backed off; once a list succeeds the store is replaced.
#[tokio::test]
async fn outage_keeps_the_last_state_until_a_new_list() {
    let tree = Kubepods::new("outage", &[&POD_A, &POD_B, &POD_C, &POD_D, &POD_E]);
    let mut p = Pipeline::start();

    let send = p.api.list().await;
    respond(send, StatusCode::OK, pod_list("1", &[&POD_A, &POD_B])).await;
    let send = p.api.watch("1").await;
    assert_eq!(names(&p.store), set(&["a", "b"]));

    // 1. One event, then the body ends in the middle of the next line (a
    // connection cut between chunks). The cut event is dropped without an
    // error and the watch resumes from the last complete event's version,
    // so the server sends it again.
    let mut body = respond_open(send);
    write(&mut body, watch_event("ADDED", json!(pod(&POD_C)))).await;
    let cut = watch_event("ADDED", json!(pod(&POD_D)));
    write(&mut body, cut[..cut.len() / 2].to_vec()).await;
    drop(body);
    let send = p.api.watch("2").await;
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));
    p.reconciler_sees(&["a", "b", "c"]).await;
    assert_eq!(
        p.watch_errors(),
        0,
        "a closed watch is routine, not an error"
    );

    // 2. The watch starts, then the connection is reset.
    let body = respond_open(send);
    body.abort(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let send = p.api.watch("2").await;
    assert_eq!(p.watch_errors(), 1);
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));

    // 3. The API server answers 500.
    let error = serde_json::to_vec(&status(500, "InternalError", "etcdserver: leader changed"));
    respond(send, StatusCode::INTERNAL_SERVER_ERROR, error.unwrap()).await;
    let send = p.api.watch("2").await;
    assert_eq!(p.watch_errors(), 2);
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));

    // 4. The API server cannot be reached at all.
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    let send = p.api.watch("2").await;
    assert_eq!(p.watch_errors(), 3);
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));

    // 5. It is back, but resourceVersion 2 was compacted meanwhile.
    let mut body = respond_open(send);
    write(&mut body, watch_event("ERROR", gone("2"))).await;
    let send = p.api.list().await;
    assert_eq!(p.watch_errors(), 4);
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));
    drop(body);

    // 6. The relist fails twice: 500, then no connection. The store still
    // holds the last complete list, not an empty or partial one.
    let error = serde_json::to_vec(&status(
        500,
        "InternalError",
        "etcdserver: request timed out",
    ));
    respond(send, StatusCode::INTERNAL_SERVER_ERROR, error.unwrap()).await;
    let send = p.api.list().await;
    assert_eq!(p.watch_errors(), 5);
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    let send = p.api.list().await;
    assert_eq!(p.watch_errors(), 6);
    assert_eq!(names(&p.store), set(&["a", "b", "c"]));
    p.reconciler_sees(&["a", "b", "c"]).await;
    assert_eq!(
        tree.compute(&p.store),
        tree.entries(&[&POD_A, &POD_B, &POD_C]),
        "during the outage the allow map must stay as it was"
    );

    // 7. The list succeeds: A and C were deleted, D and E created, all
    // unseen. The store is replaced and the watch resumes from the list.
    respond(
        send,
        StatusCode::OK,
        pod_list("9", &[&POD_B, &POD_D, &POD_E]),
    )
    .await;
    let _watch = p.api.watch("9").await;
    assert_eq!(names(&p.store), set(&["b", "d", "e"]));
    p.reconciler_sees(&["b", "d", "e"]).await;
    assert_eq!(
        tree.compute(&p.store),
        tree.entries(&[&POD_B, &POD_D]),
        "E is not allowed by the policy; A and C are gone"
    );
    assert_eq!(p.watch_errors(), 6);

    // Every error was backed off. Failed watch restarts back off further
    // each time (2, 3, 4 errors in a row), but a failed LIST never does:
    // the watcher yields `Event::Init` (an `Ok`) before every list attempt,
    // and `StreamBackoff` resets on any `Ok`. With the default backoff that
    // means relist retries stay at its first step (~0.8 s) however long
    // the list keeps failing.
    assert_eq!(p.backoff_attempts(), [1, 2, 3, 4, 1, 1]);
}
