import requests


def test_hello(server):
    srv = server("basic:hello", "-w", "2")
    response = requests.get(srv.url + "/")
    assert response.status_code == 200
    assert response.text == "hello, world\n"
    assert response.headers["Server"] == "forkserver"
