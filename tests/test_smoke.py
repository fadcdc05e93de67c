from tests.helpers import work


def test_submit_and_complete(app, api, fake_provider):
    task = api.submit("hello there")
    assert task["status"] == "PENDING"
    work(app)
    done = api.task(task["id"])
    assert done["status"] == "COMPLETED", done
    assert done["result"] == "Echo: hello there"
    assert done["progress"] == 100
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 3}
