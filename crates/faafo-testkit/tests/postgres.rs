//! The harness itself: a server starts, serves, stops and resumes with its data.

use faafo_testkit::{PostgresServer, TcpProxy};

async fn query_one(url: &str) -> Result<i32, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .query_one("SELECT 1", &[])
        .await
        .map(|row| row.get(0))
}

#[tokio::test]
async fn a_server_serves_stops_and_resumes() {
    let mut server = PostgresServer::start();
    let url = server.create_database().await;
    assert_eq!(query_one(&url).await.unwrap(), 1);
    server.stop();
    assert!(query_one(&url).await.is_err());
    server.resume();
    assert_eq!(
        query_one(&url).await.unwrap(),
        1,
        "the database survived the restart"
    );
}

#[tokio::test]
async fn the_proxy_cuts_and_restores() {
    let server = PostgresServer::start();
    let url = server.create_database().await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", server.port()).parse().unwrap()).await;
    let through = url.replace(
        &format!(":{}/", server.port()),
        &format!(":{}/", proxy.address().port()),
    );
    let (client, connection) = tokio_postgres::connect(&through, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    proxy.cut();
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "the open connection was cut"
    );
    assert!(
        query_one(&through).await.is_err(),
        "new connections are refused"
    );
    proxy.restore();
    assert_eq!(query_one(&through).await.unwrap(), 1);
}
