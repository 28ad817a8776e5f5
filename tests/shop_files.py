"""A grocery-style order export with foreign column names, no price and no timestamps, built from
the synthetic shop so that its planted personas are the truth: what a new user brings."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.synthetic import make_shop
from streams.demo import write_truth_csv

COLUMNS = "user_id=customer,item_id=product_id,item_name=product_name,ts=order_number"


def write_grocery_shop(folder: Path, n_users: int = 120, seed: int = 1) -> dict[str, Path]:
    """orders.csv (order_id, customer, order_number, days_since_prior_order, product_id,
    product_name, aisle, department), personas.json and truth.csv (CustomerID, personas)."""
    folder.mkdir(parents=True, exist_ok=True)
    shop = make_shop(n_users=n_users, n_items=max(60, n_users // 2), seed=seed)
    f = shop.frame
    order = f.groupby("user_id")["ts"].rank(method="dense").astype(int)
    orders = pd.DataFrame({
        "order_id": f["user_id"] + "-" + order.astype(str),
        "customer": f["user_id"],
        "order_number": order,
        "days_since_prior_order": (order > 1).astype(int) * 7,
        "product_id": f["item_id"],
        "product_name": f["item_name"],
        "aisle": "aisle",
        "department": "department",
    }).sample(frac=1.0, random_state=seed)  # an export is in no particular order
    paths = {"orders": folder / "orders.csv", "personas": folder / "personas.json",
             "truth": folder / "truth.csv"}
    orders.to_csv(paths["orders"], index=False)
    paths["personas"].write_text(shop.personas.to_json())
    write_truth_csv(shop.user_truth, shop.personas.names, paths["truth"])
    return paths


if __name__ == "__main__":  # python -m tests.shop_files FOLDER: the example of docs/your-data.md
    import sys

    for name, path in write_grocery_shop(Path(sys.argv[1] if len(sys.argv) > 1 else "shop")).items():
        print(f"{name}: {path}")
