"""Prices and fallbacks in the catalog, exact money, and setting budgets (CLI, admin page, default)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.helpers import csrf_from, login, make_user
from tests.priced import make_priced_app, priced_models
from webapp import create_app, money
from webapp.catalog import load_catalog
from webapp.extensions import db
from webapp.models import User

BASE = {"LOCAL_MODEL_URL": "http://127.0.0.1:9/v1", "LOCAL_MODEL_PARALLEL": 1}
URL = "http://127.0.0.1:9/v1"


def catalog_of(**models):
    return load_catalog(
        {**BASE, "MODELS": {name: {"base_url": URL, "upstream": name, **entry} for name, entry in models.items()}}
    )


def refusal(**models) -> str:
    with pytest.raises(ValueError) as caught:
        catalog_of(**models)
    return str(caught.value)


# -- the catalog -------------------------------------------------------------------------------


def test_prices_default_to_free_and_read_exactly():
    cat = catalog_of(paid={"usd_per_million_input_tokens": 0.15, "usd_per_million_output_tokens": "0.6"}, other={})
    assert cat.get("local").is_free and cat.get("other").is_free
    paid = cat.get("paid")
    # A TOML float 0.15 is the decimal 0.15, not the binary float's 0.1499999…
    assert paid.usd_per_million_input_tokens == Decimal("0.15")
    assert paid.cost(1234, 567) == Decimal("0.0005253")  # 1234 × 0.15 / 1e6 + 567 × 0.6 / 1e6, exactly


@pytest.mark.parametrize(
    "value, words",
    [
        (-1, "greater than or equal to 0"),
        ("cheap", "valid decimal"),
        (float("nan"), "finite"),
        ("0.1234567", "6 decimal"),
    ],
)
@pytest.mark.parametrize("key", ["usd_per_million_input_tokens", "usd_per_million_output_tokens"])
def test_a_bad_price_is_refused_naming_the_key(key, value, words):
    message = refusal(gpt={key: value})
    assert f"model 'gpt' in the catalog: {key}:" in message and words in message


def test_a_bad_price_stops_the_app_from_starting(app):
    models = {"gpt": {"base_url": URL, "upstream": "x", "usd_per_million_output_tokens": -2}}
    with pytest.raises(ValueError, match="usd_per_million_output_tokens"):
        create_app({"TESTING": True, "SECRET_KEY": "x", "DATABASE_URL": app.config["DATABASE_URL"], "MODELS": models})


def test_fallbacks_chain_depth_first_without_repeats():
    cat = catalog_of(a={"fallbacks": ["b", "c"]}, b={"fallbacks": ["d"]}, c={"fallbacks": ["d"]}, d={})
    assert [spec.name for spec in cat.chain("a")] == ["a", "b", "d", "c"]
    assert [spec.name for spec in cat.chain("d")] == ["d"]


def test_fallbacks_to_an_unknown_model_are_refused_naming_the_key():
    message = refusal(a={"fallbacks": ["local", "gpt-5"]})
    assert "model 'a'" in message and "fallbacks names 'gpt-5'" in message and "not in the catalog" in message


@pytest.mark.parametrize(
    "models, cycle",
    [
        ({"a": {"fallbacks": ["a"]}}, "a → a"),
        ({"a": {"fallbacks": ["b"]}, "b": {"fallbacks": ["a"]}}, "a → b → a"),
        ({"a": {"fallbacks": ["b"]}, "b": {"fallbacks": ["c"]}, "c": {"fallbacks": ["b"]}}, "b → c → b"),
    ],
)
def test_fallback_cycles_are_refused_naming_the_key(models, cycle):
    message = refusal(**models)
    assert "fallbacks make a cycle" in message and cycle in message


def test_models_api_shows_prices_and_fallbacks(app, fake_provider):
    from tests.helpers import ApiClient
    from webapp.services import accounts

    priced = make_priced_app(app, fake_provider.url)
    make_user(priced, "alice")
    with priced.app_context():
        _, token = accounts.create_token(accounts.find_user("alice"), "t")
    items = {m["name"]: m for m in ApiClient(priced.test_client(), token, None).get("/models").get_json()["items"]}
    assert items["dear"]["usd_per_million_output_tokens"] == 10
    assert items["cheap"]["usd_per_million_input_tokens"] == 0.15
    assert items["chained"]["fallbacks"] == ["dear", "cheap"]
    assert items["local"]["usd_per_million_input_tokens"] == 0 and items["local"]["fallbacks"] == []
    assert set(priced_models("x")) <= set(items)


# -- money ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount, shown",
    [
        ("0", "$0.00"),
        ("12.5", "$12.50"),
        ("1234.5", "$1,234.50"),
        ("0.000123", "$0.000123"),
        ("0.1", "$0.10"),
        ("4.996", "$5.00"),
    ],
)
def test_amounts_read_for_people(amount, shown):
    assert money.usd(Decimal(amount)) == shown


def test_amounts_in_json_keep_their_digits():
    import json

    for text in ("0.0005253", "1234.567890123", "0.000000000001"):
        assert json.loads(json.dumps({"v": money.as_json(Decimal(text))}), parse_float=Decimal)["v"] == Decimal(text)


# -- budgets: the CLI, the default and the Users page -----------------------------------------------


def budget_of(app, name: str):
    with app.app_context():
        user = db.session.scalar(db.select(User).where(User.username == name))
        db.session.remove()
        return user.budget_is_default, user.monthly_budget_usd


def test_users_budget_sets_dollars_none_and_default(runner, app):
    make_user(app, "alice")
    result = runner.invoke(args=["users", "budget", "alice", "12.50"])
    assert result.exit_code == 0, result.output
    assert "alice's monthly budget is $12.50 a month" in result.output
    assert budget_of(app, "alice") == (False, Decimal("12.5"))
    assert "no limit" in runner.invoke(args=["users", "budget", "ALICE", "none"]).output
    assert budget_of(app, "alice") == (False, None)
    assert "the default (no limit)" in runner.invoke(args=["users", "budget", "alice", "default"]).output
    assert budget_of(app, "alice") == (True, None)


@pytest.mark.parametrize(
    "value, words",
    [
        ("-5", "cannot be negative"),
        ("NaN", "not an amount"),
        ("inf", "not an amount"),
        ("ten", "not an amount"),
        ("1.0000001", "6 decimal"),
    ],
)
def test_users_budget_refuses_bad_amounts_and_changes_nothing(runner, app, value, words):
    make_user(app, "alice")
    runner.invoke(args=["users", "budget", "alice", "3"])
    result = runner.invoke(args=["users", "budget", "alice", value])
    assert result.exit_code != 0 and words in result.output
    assert budget_of(app, "alice") == (False, Decimal(3))


def test_users_budget_refuses_an_unknown_user(runner, app):
    result = runner.invoke(args=["users", "budget", "nobody", "5"])
    assert result.exit_code != 0 and "No user named 'nobody'" in result.output


def test_the_default_budget_applies_to_users_without_one(app, fake_provider):
    with pytest.raises(ValueError, match="DEFAULT_MONTHLY_BUDGET_USD: A budget cannot be negative"):
        make_priced_app(app, fake_provider.url, DEFAULT_MONTHLY_BUDGET_USD="-1")
    with pytest.raises(ValueError, match="DEFAULT_MONTHLY_BUDGET_USD: 'lots' is not an amount"):
        make_priced_app(app, fake_provider.url, DEFAULT_MONTHLY_BUDGET_USD="lots")
    priced = make_priced_app(app, fake_provider.url, DEFAULT_MONTHLY_BUDGET_USD="20")
    assert priced.config["DEFAULT_MONTHLY_BUDGET_USD"] == Decimal(20)
    from webapp.budgets import budget_of as budget

    with app.app_context():
        assert budget(User(budget_is_default=True)) is None  # the shared app has no default
    with priced.app_context():
        assert budget(User(budget_is_default=True)) == Decimal(20)
        assert budget(User(budget_is_default=False, monthly_budget_usd=Decimal(5))) == Decimal(5)
        assert budget(User(budget_is_default=False, monthly_budget_usd=None)) is None


@pytest.fixture
def admin_client(app, client):
    make_user(app, "root", admin=True)
    make_user(app, "alice")
    login(client, "root")
    return client


def alice_id(app) -> int:
    with app.app_context():
        return db.session.scalar(db.select(User.id).where(User.username == "alice"))


def test_admins_set_a_budget_on_the_users_page(app, admin_client):
    token = csrf_from(admin_client.get("/admin/users").get_data(as_text=True))
    response = admin_client.post(f"/admin/users/{alice_id(app)}/budget", data={"csrf_token": token, "budget": "$40"})
    assert response.status_code == 303
    assert budget_of(app, "alice") == (False, Decimal(40))
    page = admin_client.get("/admin/users").get_data(as_text=True)
    assert "alice&#39;s monthly budget is $40.00 a month" in page
    assert f'id="budget-{alice_id(app)}" name="budget" inputmode="decimal" size="9" value="40"' in page
    admin_client.post(f"/admin/users/{alice_id(app)}/budget", data={"csrf_token": token, "budget": ""})
    assert budget_of(app, "alice") == (True, None)


@pytest.mark.parametrize(
    "value, words", [("-1", "cannot be negative"), ("nan", "not an amount"), ("a lot", "not an amount")]
)
def test_the_users_page_refuses_a_bad_budget_beside_the_field(app, admin_client, value, words):
    token = csrf_from(admin_client.get("/admin/users").get_data(as_text=True))
    response = admin_client.post(f"/admin/users/{alice_id(app)}/budget", data={"csrf_token": token, "budget": value})
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert f'id="budget-{alice_id(app)}-error" role="alert">' in page and words in page
    assert 'aria-invalid="true"' in page
    assert budget_of(app, "alice") == (True, None)


def test_a_budget_for_a_user_that_does_not_exist_is_404(app, admin_client):
    token = csrf_from(admin_client.get("/admin/users").get_data(as_text=True))
    assert admin_client.post("/admin/users/99999/budget", data={"csrf_token": token, "budget": "5"}).status_code == 404
