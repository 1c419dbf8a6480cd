//! The shape every periodic background service shares: look at the current
//! config, do what is due, wait, and stop when Pingora shuts down.

use pingora::server::ShutdownWatch;
use std::future::Future;
use std::time::Duration;

/// Runs `tick`, then waits `period`, until shutdown (which also ends a wait).
pub async fn every<Fut>(
    shutdown: &mut ShutdownWatch,
    period: Duration,
    mut tick: impl FnMut() -> Fut,
) where
    Fut: Future<Output = ()>,
{
    every_or_woken(shutdown, period, || {
        let work = tick();
        async move {
            work.await;
            None::<std::future::Pending<()>>
        }
    })
    .await
}

/// Like [`every`], but `tick` may also return a future that ends the wait
/// early (work asked for before the period is up).
pub async fn every_or_woken<Fut, Wake>(
    shutdown: &mut ShutdownWatch,
    period: Duration,
    mut tick: impl FnMut() -> Fut,
) where
    Fut: Future<Output = Option<Wake>>,
    Wake: Future<Output = ()>,
{
    loop {
        let wake = tick().await;
        let woken = async {
            match wake {
                Some(w) => w.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = woken => {}
            _ = shutdown.changed() => return,
        }
    }
}
