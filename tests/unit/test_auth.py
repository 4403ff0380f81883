import pytest

from server.auth import ApiKey, AuthConfig, AuthError, allowed, bearer, check, normalize_path, required
from server.configload import parse_settings
from server.errors import ConfigError

AUTH = AuthConfig(api_keys=(ApiKey("sk-a", "a"), ApiKey("sk-b", "b", models=("small",))),
                  admin_key="sk-admin")


@pytest.mark.parametrize("path,norm", [("/V1//chat/completions/", "/v1/chat/completions"),
                                       ("//", "/"), ("/Admin/Models", "/admin/models")])
def test_normalize(path, norm):
    assert normalize_path(path) == norm


def test_what_each_path_needs():
    assert required(AuthConfig(), "/v1/chat/completions") == "none"
    for path in ("/v1/chat/completions", "/v1//chat/completions", "/V1/chat/completions/",
                 "/invocations", "/tokenize", "/sleep", "/whatever"):
        assert required(AUTH, path) == "api", path
    assert required(AUTH, "/health") == "none" and required(AUTH, "/metrics") == "none"
    assert required(AuthConfig(api_keys=AUTH.api_keys, metrics_auth=True), "/metrics") == "api"
    assert required(AUTH, "/admin/models") == "admin" and required(AUTH, "/ADMIN//reload/") == "admin"
    assert required(AuthConfig(api_keys=AUTH.api_keys), "/admin/models") == "api"
    # The console's static files are open; its data routes are not.
    for path in ("/ui", "/ui/", "/UI//console.js", "/ui/vendor/uPlot.min.css", "/ui/config.json"):
        assert required(AUTH, path) == "none", path
    for path in ("/uix", "/console/state", "/console/traffic", "/ui-data"):
        assert required(AUTH, path) == "api", path


def test_check_keys():
    assert check(AUTH, "/v1/models", "Bearer sk-a").name == "a"
    assert check(AUTH, "/v1/models", "bearer sk-admin").name == "admin"
    assert check(AUTH, "/admin/reload", "Bearer sk-admin").name == "admin"
    for header in (None, "", "Bearer", "Basic sk-a", "Bearer sk-c", "sk-a"):
        with pytest.raises(AuthError) as info:
            check(AUTH, "/v1/models", header)
        assert info.value.status == 401 and info.value.code == "invalid_api_key"
        assert "sk-" not in info.value.message
    with pytest.raises(AuthError):
        check(AUTH, "/admin/models", "Bearer sk-a")
    assert bearer("Bearer  tok ") == "tok"


def test_allowlist_and_reprs_hide_keys():
    assert allowed(None, ("m",)) and allowed(AUTH.api_keys[0], ("m",))
    assert allowed(AUTH.api_keys[1], ("echo", "small")) and not allowed(AUTH.api_keys[1], ("m",))
    assert "sk-" not in repr(AUTH) and "sk-" not in repr(AUTH.api_keys[0])


def test_auth_config_parsing():
    s = parse_settings({"models": [{"name": "m", "path": "p"}],
                        "api_keys": ["sk-1", {"key": "sk-2", "name": "ci", "models": ["m"], "rpm": 60}],
                        "admin_key": "sk-adm", "cors_origins": ["*"]},
                       api_keys=("sk-env",))
    keys = s.auth.api_keys
    assert [k.name for k in keys] == ["key-1", "ci", "env-1"] and keys[1].rpm == 60
    assert s.auth.admin_key == "sk-adm" and s.auth.cors_origins == ("*",)
    assert "sk-" not in repr(s)
    with pytest.raises(ConfigError, match=r"^api_keys\[0\]\.models"):
        parse_settings({"models": [{"name": "m", "path": "p"}], "api_keys": [{"key": "k", "models": "m"}]})
    with pytest.raises(ConfigError, match=r"^api_keys\[0\]\.key"):
        parse_settings({"models": [{"name": "m", "path": "p"}], "api_keys": [{"name": "x"}]})
