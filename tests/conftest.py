def pytest_collection_modifyitems(config, items):
    # e2e tests last: they are the slow ones, and a quick failure elsewhere should show first.
    items.sort(key=lambda item: "tests/e2e/" in str(item.fspath).replace("\\", "/"))
