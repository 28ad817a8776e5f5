"""A seeded synthetic shop with planted personas: ground truth the real data does not have.

Every user holds 1–5 planted personas drawn with an imbalanced prevalence (so de-biasing
matters) and buys mostly items of those personas; items carry readable names built from a
persona's vocabulary ("Stainless Steel Chef Knife"), so a text labeler can recover personas
from purchase histories, and item popularity is Zipf-like. Everything is vectorised: 50k users
take a few seconds.

>>> shop = make_shop(n_users=50, n_items=80, n_personas=4, seed=1)
>>> len(shop.user_truth), shop.frame["event_id"].is_unique
(50, True)
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.data import CANONICAL_COLUMNS
from core.graph import BipartiteGraph
from core.personas import Persona, PersonaSet

__all__ = ["SyntheticShop", "make_shop", "make_sparse_shop", "default_personas", "top_set_share",
           "CATALOGUE", "GROCERY", "GENERIC_ITEMS"]

log = logging.getLogger(__name__)

FRAME_COLUMNS = list(CANONICAL_COLUMNS)


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    """A persona plus the words its product names are made of.

    `modifiers` × `nouns` name the persona's own products; `cross` are modifiers that still read
    naturally on another persona's noun and name the items this persona shares.
    """

    persona: Persona
    modifiers: tuple[str, ...]
    nouns: tuple[str, ...]
    cross: tuple[str, ...]


def _v(name: str, definition: str, modifiers: str, nouns: str, cross: str) -> _Vocabulary:
    def split(s: str) -> tuple[str, ...]:
        return tuple(w.strip() for w in s.split(";") if w.strip())

    return _Vocabulary(Persona(name, definition), split(modifiers), split(nouns), split(cross))


CATALOGUE: tuple[_Vocabulary, ...] = (
    _v("Busy Parent",
       "Parents of babies and young children who buy convenient baby care, kids' and family essentials.",
       "Organic Baby; Toddler; Kids'; Infant; Newborn; Baby; Children's; Family-Size",
       "Food Pouches; Wipes; Nappies; Sippy Cup; Bath Toys; Car Seat Cover; Lunch Box; Teething Ring; "
       "Bottle Set; Sleepsuit; Snack Pots; Night Light; Changing Mat; Pushchair Organiser",
       "Kids'; Family-Size; Toddler-Safe"),
    _v("Bargain Hunter",
       "Price-driven shoppers who stock up on bulk packs, multibuys and budget household staples.",
       "Value; Bulk; Budget; Economy; Multipack; Bumper Pack; Clearance; Saver",
       "Toilet Rolls; Laundry Detergent; Bin Bags; Dishwasher Tablets; Kitchen Roll; Washing-Up Liquid; "
       "Sponges; Cling Film; Batteries; Tinned Tomatoes; Pasta; Rice; Fabric Softener; Hand Soap",
       "Value Pack; Budget; Multipack"),
    _v("Home Chef",
       "Keen home cooks who invest in quality cookware, knives and gourmet ingredients.",
       "Stainless Steel; Cast Iron; Professional; Gourmet; Non-Stick; Copper; Artisan; Chef's",
       "Chef Knife; Frying Pan; Dutch Oven; Saucepan Set; Spice Rack; Cutting Board; Whisk; "
       "Stock Pot; Mandoline Slicer; Pasta Maker; Roasting Tin; Rolling Pin; Wok; Knife Sharpener",
       "Gourmet; Chef's; Kitchen"),
    _v("Fitness Enthusiast",
       "Active people who train regularly and buy gym gear, sports nutrition and workout equipment.",
       "Gym; Workout; Training; Sports; Pro Fitness; Performance; Athletic; Heavy-Duty",
       "Dumbbells; Protein Powder; Yoga Mat; Kettlebell; Resistance Bands; Running Shoes; Foam Roller; "
       "Shaker Bottle; Jump Rope; Pull-Up Bar; Energy Bars; Weightlifting Gloves; Fitness Tracker; Gym Bag",
       "Sport; Workout; Active"),
    _v("Pet Owner",
       "Devoted dog and cat owners who regularly buy pet food, treats, toys and care products.",
       "Dog; Cat; Puppy; Kitten; Pet; Senior Dog; Indoor Cat; Small Breed Dog",
       "Food; Treats; Chew Toy; Litter; Collar; Lead; Bed; Scratching Post; Grooming Brush; Flea Shampoo; "
       "Feeding Bowl; Carrier; Poop Bags; Dental Sticks",
       "Pet-Friendly; Paw-Print; Dog-Themed"),
    _v("Gardener",
       "Green-fingered people who grow plants, flowers and vegetables and tend their garden.",
       "Garden; Allotment; Greenhouse; Herb Garden; Vegetable Patch; Gardener's; Horticultural; Flower Bed",
       "Trowel; Pruning Shears; Seed Packets; Watering Can; Potting Soil; Plant Pots; Hose Reel; "
       "Raised Bed; Bulbs; Gardening Gloves; Rake; Greenhouse Shelving; Tomato Feed; Kneeler",
       "Garden; Botanical; Floral"),
    _v("Tech Enthusiast",
       "Early adopters of gadgets who buy electronics, smart-home devices and computer accessories.",
       "Wireless; Bluetooth; Smart; USB-C; High-Speed; Digital; Ultra-Slim; Portable",
       "Headphones; Charger; Keyboard; Webcam; Smart Plug; Power Bank; Gaming Mouse; Monitor Stand; "
       "SSD Drive; Router; Smartwatch; Speaker; Graphics Tablet; HDMI Cable",
       "Smart; USB-Rechargeable; Bluetooth"),
    _v("Book Lover",
       "Avid readers who buy novels, hardbacks and reading accessories.",
       "Hardback; Paperback; Illustrated; Bestselling; Classic; Collector's Edition; Signed; Literary",
       "Novel; Mystery Thriller; Poetry Collection; Biography; Fantasy Trilogy; Bookmark Set; Reading Lamp; "
       "Book Stand; Short Stories; Historical Fiction; Book Light; Journal; Crime Novel; Literary Classic",
       "Bookish; Literary; Reader's"),
    _v("Outdoor Adventurer",
       "Hikers and campers who buy tents, trail gear and equipment for life outdoors.",
       "Hiking; Camping; Waterproof; Trail; Ultralight; Trekking; Insulated; Mountain",
       "Tent; Backpack; Sleeping Bag; Head Torch; Walking Poles; Boots; Compass; Water Filter; "
       "Camping Stove; Rain Jacket; Hammock; Thermal Flask; Multi-Tool; First Aid Kit",
       "Waterproof; Camping; Outdoor"),
    _v("Beauty Aficionado",
       "Skincare and make-up lovers who buy cosmetics, serums and beauty tools.",
       "Luxury Beauty; Vegan; Long-Lasting; Hydrating; Radiant; Rose Gold; Professional Makeup; Cruelty-Free",
       "Face Serum; Lipstick; Mascara; Moisturiser; Eyeshadow Palette; Foundation; Face Mask; "
       "Nail Polish; Makeup Brushes; Cleanser; Highlighter; Eye Cream; Setting Spray; Toner",
       "Beauty; Glow; Rose-Scented"),
    _v("Party Planner",
       "Hosts who organise celebrations and buy party decorations, tableware and supplies.",
       "Birthday; Party; Confetti; Glitter; Celebration; Foil; Neon; Festive",
       "Balloons; Banner; Paper Plates; Napkins; Cake Toppers; Streamers; Party Hats; Candles; "
       "Piñata; Photo Booth Props; Party Bags; Bunting; Table Cover; Sparklers",
       "Party; Celebration; Birthday"),
    _v("Eco-conscious Shopper",
       "Sustainability-minded shoppers who choose reusable, organic, plastic-free and recycled products.",
       "Bamboo; Reusable; Compostable; Recycled; Plastic-Free; Organic Cotton; Zero-Waste; Biodegradable",
       "Toothbrush; Shopping Bag; Beeswax Wraps; Water Bottle; Straws; Coffee Cup; Produce Bags; "
       "Cleaning Cloths; Shampoo Bar; Cotton Pads; Food Containers; Dish Brush; Razor; Laundry Eggs",
       "Organic; Recycled; Bamboo"),
    _v("Coffee Connoisseur",
       "Coffee lovers who brew at home and buy specialty beans and brewing equipment.",
       "Espresso; Barista; Specialty Coffee; Home Barista; Café-Style; Artisan Coffee; Premium Coffee; Coffee Lover's",
       "Coffee Beans; Grinder; French Press; Milk Frother; Coffee Machine; Tamper; Drip Kettle; "
       "Coffee Filters; Latte Mugs; Cafetiere; Moka Pot; Ground Coffee; Coffee Scale; Aeropress",
       "Café; Espresso; Coffee-Scented"),
    _v("Arts and Crafts Hobbyist",
       "Makers who knit, sew, paint and craft, buying art supplies and craft materials.",
       "Acrylic; Watercolour; Knitting; Embroidery; Sewing; Scrapbooking; Calligraphy; Origami",
       "Paint Set; Brushes; Yarn; Needles; Sketchbook; Canvas; Glue Gun; Thread Kit; Stencils; "
       "Beads; Fabric Bundle; Crochet Hooks; Cutting Mat; Easel",
       "DIY; Hand-Painted; Handmade"),
    _v("Frequent Traveller",
       "Travellers who fly often and buy luggage, travel-size toiletries and travel accessories.",
       "Travel; Carry-On; Travel-Size; Compact; Passport; Jet-Lag; In-Flight; Luggage",
       "Suitcase; Neck Pillow; Toiletry Bag; Adapter Plug; Packing Cubes; Eye Mask; Luggage Tag; "
       "Passport Holder; Travel Wallet; Luggage Scale; Miniature Bottles; Duffel Bag; Earplugs; Lock",
       "Travel-Size; Compact; Portable"),
    _v("Video Gamer",
       "Gamers who buy consoles, video games and gaming accessories.",
       "Gaming; RGB; Console; Pro; Wireless Gaming; Esports; Retro Gaming; Limited Edition",
       "Controller; Headset; Video Game; Gaming Chair; Console Bundle; Mouse Mat; Charging Dock; "
       "Capture Card; Arcade Stick; Game Gift Card; Streaming Microphone; Steering Wheel; VR Headset; "
       "Keycaps",
       "Gaming; RGB; Gamer's"),
)

def _g(name: str, what: str, modifiers: str, nouns: str, cross: str) -> _Vocabulary:
    return _v(name, f"Shoppers who regularly buy {what}.", modifiers, nouns, cross)


#: A second, grocery-like catalogue for `make_sparse_shop`: 30 personas with short vocabularies.
GROCERY: tuple[_Vocabulary, ...] = (
    _g("Vegan Cook", "plant-based meals, tofu and dairy-free alternatives", "Vegan; Plant-Based; Dairy-Free; Meat-Free",
       "Tofu; Tempeh; Oat Milk; Seitan; Lentil Burger; Cashew Cheese", "Vegan; Plant"),
    _g("Home Baker", "flour, yeast and baking ingredients", "Baking; Self-Raising; Strong White; Bake-at-Home",
       "Flour; Yeast; Caster Sugar; Baking Powder; Icing Sugar; Cake Tin", "Baking; Home-Baked"),
    _g("Wine Lover", "red, white and sparkling wines", "Rioja; Merlot; Prosecco; Chardonnay",
       "Wine; Red Wine; White Wine; Rosé; Sparkling Wine; Wine Glasses", "Wine; Vintage"),
    _g("Tea Drinker", "loose leaf and bagged teas", "Earl Grey; Green; Herbal; Assam",
       "Tea Bags; Loose Leaf Tea; Teapot; Tea Infuser; Chai; Rooibos", "Tea; Infused"),
    _g("Snack Lover", "crisps, nuts and savoury snacks", "Salted; Sour Cream; Crunchy; Sharing",
       "Crisps; Tortilla Chips; Pretzels; Popcorn; Peanuts; Crackers", "Snack; Crunchy"),
    _g("Health Food Fan", "superfoods, seeds and protein snacks", "Superfood; High-Protein; Raw; Sugar-Free",
       "Chia Seeds; Quinoa; Protein Bar; Granola; Flaxseed; Goji Berries", "Healthy; Wholesome"),
    _g("Barbecue Griller", "barbecue meat, charcoal and grilling kit", "BBQ; Smoky; Chargrilled; Hickory",
       "Charcoal; Burgers; Sausages; Ribs; Skewers; Marinade", "BBQ; Grill"),
    _g("Asian Cuisine Cook", "noodles, soy sauce and Asian ingredients", "Thai; Japanese; Szechuan; Korean",
       "Noodles; Soy Sauce; Miso Paste; Rice Vinegar; Kimchi; Curry Paste", "Oriental; Wok"),
    _g("Italian Cuisine Cook", "pasta, pesto and Italian ingredients", "Italian; Tuscan; Sicilian; Fresh Egg",
       "Spaghetti; Pesto; Passata; Parmesan; Gnocchi; Risotto Rice", "Italian; Trattoria"),
    _g("Mexican Cuisine Cook", "tortillas, salsa and Mexican ingredients", "Mexican; Chipotle; Jalapeño; Smoky Chilli",
       "Tortillas; Salsa; Refried Beans; Taco Shells; Guacamole; Fajita Kit", "Mexican; Spicy"),
    _g("Breakfast Lover", "cereals, spreads and breakfast foods", "Breakfast; Honey; Wholegrain; Crunchy Oat",
       "Cereal; Porridge Oats; Marmalade; Muesli; Pancake Mix; Croissants", "Morning; Breakfast"),
    _g("Dairy Lover", "cheese, yoghurt and butter", "Mature; Greek-Style; Creamy; Farmhouse",
       "Cheddar; Yoghurt; Butter; Cream; Brie; Cottage Cheese", "Dairy; Creamy"),
    _g("Seafood Lover", "fish and shellfish", "Smoked; Line-Caught; Wild; Atlantic",
       "Salmon; Prawns; Cod Fillets; Mussels; Tuna Steaks; Mackerel", "Seafood; Coastal"),
    _g("Meat Lover", "steaks, roasts and fresh meat", "Aberdeen Angus; Free-Range; Dry-Aged; Outdoor-Bred",
       "Sirloin Steak; Pork Chops; Chicken Thighs; Lamb Shank; Beef Mince; Gammon", "Butcher's; Prime"),
    _g("Sweet Tooth", "chocolate, sweets and desserts", "Milk Chocolate; Salted Caramel; Fudge; Candy",
       "Chocolate Bar; Gummy Bears; Toffees; Brownies; Marshmallows; Truffles", "Sweet; Sugary"),
    _g("Soft Drinks Fan", "fizzy drinks, juices and squash", "Sparkling; Diet; Tropical; Cloudy",
       "Cola; Lemonade; Orange Juice; Squash; Ginger Beer; Energy Drink", "Fizzy; Refreshing"),
    _g("Craft Beer Fan", "craft beers, ales and lagers", "IPA; Pale Ale; Stout; Craft",
       "Beer; Lager; Porter; Cider; Beer Glasses; Bitter", "Brewery; Hoppy"),
    _g("Spirits Collector", "whisky, gin and spirits", "Single Malt; London Dry; Spiced; Aged",
       "Whisky; Gin; Rum; Vodka; Tonic Water; Cocktail Shaker", "Distilled; Premium"),
    _g("Frozen Food Shopper", "ready meals and frozen food", "Frozen; Microwave; Oven-Ready; Family Freezer",
       "Pizza; Chips; Fish Fingers; Ice Cream; Peas; Ready Meal", "Frozen; Quick"),
    _g("Young Family", "baby food, nappies and kids' snacks", "Baby; Toddler; Little Ones; Kids'",
       "Baby Food; Nappies; Baby Wipes; Fruit Pouches; Rusks; Formula Milk", "Kids'; Family"),
    _g("Pet Keeper", "pet food and pet care", "Dog; Cat; Puppy; Kitten",
       "Pet Food; Dog Treats; Cat Litter; Chew Sticks; Wet Food Pouches; Kibble", "Pet; Paw"),
    _g("Clean Home Keeper", "cleaning and laundry products", "Antibacterial; Lemon Fresh; Bio; Ultra",
       "Surface Spray; Bleach; Laundry Liquid; Dishwasher Tablets; Sponges; Bin Liners", "Clean; Fresh"),
    _g("Personal Care Shopper", "toiletries and personal care", "Sensitive; Moisturising; Fresh Mint; Salon",
       "Shampoo; Shower Gel; Toothpaste; Deodorant; Body Lotion; Razors", "Care; Gentle"),
    _g("Organic Shopper", "organic and farm produce", "Organic; Farm; Heritage; Biodynamic",
       "Carrots; Eggs; Whole Milk; Apples; Spinach; Sourdough", "Organic; Natural"),
    _g("Gluten-Free Shopper", "gluten-free foods", "Gluten-Free; Coeliac-Friendly; Wheat-Free; Free-From",
       "Bread; Pasta Shells; Crackers; Flour Blend; Biscuits; Wraps", "Free-From; Gluten-Free"),
    _g("Deli Lover", "deli meats, olives and antipasti", "Deli; Cured; Marinated; Continental",
       "Salami; Olives; Prosciutto; Hummus; Sundried Tomatoes; Chorizo", "Deli; Artisan"),
    _g("Fresh Produce Fan", "fresh fruit and vegetables", "Fresh; Seasonal; Ripe; Crisp",
       "Bananas; Tomatoes; Avocados; Strawberries; Broccoli; Peppers", "Fresh; Garden"),
    _g("Spice Collector", "spices, herbs and seasonings", "Ground; Whole; Smoked; Hand-Blended",
       "Cumin; Paprika; Turmeric; Chilli Flakes; Cinnamon Sticks; Garam Masala", "Spiced; Aromatic"),
    _g("Student Saver", "budget basics and instant food", "Basics; Value; Instant; Everyday",
       "Instant Noodles; Baked Beans; Pot Noodle; Toast Bread; Tinned Soup; Frozen Pizza", "Value; Budget"),
    _g("Party Host", "party food, mixers and disposable tableware", "Party; Celebration; Sharing Platter; Festive",
       "Party Rings; Sausage Rolls; Paper Cups; Mixers; Canapés; Napkins", "Party; Festive"),
)

GENERIC_ITEMS: tuple[str, ...] = (
    "Paper Carrier Bag", "Gift Wrap Roll", "Greeting Card", "Postage", "Gift Card",
    "Sticky Tape", "AA Batteries", "Ballpoint Pens", "Envelopes", "Tissues", "Umbrella",
    "Keyring", "Notepad", "Phone Case", "Scissors", "Storage Box", "Coat Hangers", "Light Bulb",
    "Doormat", "Wall Clock",
)

_VARIANTS = ("Set of 2", "Large", "Mini", "Pack of 3", "Deluxe", "XL", "Twin Pack", "Refill")
_ANCHOR = pd.Timestamp("2024-01-01", tz="UTC").timestamp()
_YEAR = 365 * 24 * 3600.0
_QTY_P = np.array([0.45, 0.25, 0.12, 0.08, 0.06, 0.04])
_N_PERSONAS_P = np.array([0.25, 0.30, 0.22, 0.14, 0.09])  # 1..5 planted personas per user


def default_personas(n: int = 12) -> PersonaSet:
    """The first `n` personas of the built-in catalogue (at most ``len(CATALOGUE)``)."""
    if not 1 <= n <= len(CATALOGUE):
        raise ValueError(f"n_personas must be in 1..{len(CATALOGUE)}, got {n}")
    return PersonaSet(v.persona for v in CATALOGUE[:n])


@dataclass(frozen=True)
class SyntheticShop:
    """Purchases plus the planted truth: personas per user and per item (indices into `personas`)."""

    frame: pd.DataFrame
    personas: PersonaSet
    user_truth: dict[str, tuple[int, ...]]
    item_personas: dict[str, tuple[int, ...]]
    prevalence: np.ndarray = field(repr=False)

    def graph(self) -> BipartiteGraph:
        return BipartiteGraph.from_frame(self.frame)


# -- items -------------------------------------------------------------------------------------
def _name_pool(rng: np.random.Generator, firsts: Sequence[str], seconds: Sequence[str]) -> list[str]:
    """All "first second" names in a seeded random order."""
    pool = [f"{a} {b}" for a in firsts for b in seconds]
    return [pool[k] for k in rng.permutation(len(pool))]


def _make_items(
    rng: np.random.Generator, n_items: int, n_personas: int, n_generic: int, dual_frac: float,
    catalogue: Sequence[_Vocabulary] = CATALOGUE,
) -> tuple[list[str], list[tuple[int, ...]]]:
    """Readable, unique item names and their personas (generic items have none)."""
    vocab = catalogue[:n_personas]
    n_typed = n_items - n_generic
    primary = rng.permutation(np.arange(n_typed) % n_personas)
    dual = rng.random(n_typed) < (dual_frac if n_personas > 1 else 0.0)
    secondary = (primary + rng.integers(1, max(n_personas, 2), n_typed)) % n_personas
    own = [_name_pool(rng, v.modifiers, v.nouns) for v in vocab]
    shared = [[_name_pool(rng, vocab[s].cross, v.nouns) for s in range(n_personas)] for v in vocab]
    cursor: dict[tuple[int, int], int] = {}
    names: list[str] = []
    personas: list[tuple[int, ...]] = []
    taken: set[str] = set()
    for p, is_dual, s in zip(primary.tolist(), dual.tolist(), secondary.tolist()):
        pool = shared[p][s] if is_dual else own[p]
        key = (p, s if is_dual else -1)
        k = cursor.get(key, 0)
        cursor[key] = k + 1
        names.append(_unique(pool[k % len(pool)], k // len(pool), taken))
        personas.append((min(p, s), max(p, s)) if is_dual else (p,))
    generic = [GENERIC_ITEMS[k % len(GENERIC_ITEMS)] for k in range(n_generic)]
    for k, name in enumerate(generic):
        names.append(_unique(name, k // len(GENERIC_ITEMS), taken))
        personas.append(())
    return names, personas


def _unique(name: str, round_: int, taken: set[str]) -> str:
    """Add a size/pack variant once a name pool is exhausted, so every item name is distinct."""
    candidate = name if round_ == 0 else f"{name}, {_VARIANTS[(round_ - 1) % len(_VARIANTS)]}"
    extra = 1
    while candidate in taken:
        extra += 1
        candidate = f"{name} No. {extra}"
    taken.add(candidate)
    return candidate


# -- users and purchases ----------------------------------------------------------------------
def _plant_personas(
    rng: np.random.Generator, n_users: int, prevalence: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(n_users, 5) persona table sorted per row (-1 padded) and the count per user.

    Gumbel top-k draws k distinct personas with probability ∝ prevalence, all users at once.
    """
    m = len(prevalence)
    k = rng.choice(np.arange(1, 6), size=n_users, p=_N_PERSONAS_P)
    k = np.minimum(k, m)
    keys = np.log(prevalence)[None, :] + rng.gumbel(size=(n_users, m))
    order = np.argsort(-keys, axis=1)[:, : min(5, m)]
    order = np.where(np.arange(order.shape[1])[None, :] < k[:, None], order, np.iinfo(np.int64).max)
    order = np.sort(order, axis=1)
    table = np.full((n_users, 5), -1, dtype=np.int64)
    table[:, : order.shape[1]] = np.where(order == np.iinfo(np.int64).max, -1, order)
    return table, k


def _segment_sampler(
    groups: list[np.ndarray], weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated per-group CDFs shifted by the group index: sample group g with g + U(0,1)."""
    cdfs, members = [], []
    for g, items in enumerate(groups):
        w = weights[items]
        cdfs.append(g + np.cumsum(w) / w.sum())
        members.append(items)
    return np.concatenate(cdfs), np.concatenate(members)


def _resolve_repeats(parent: np.ndarray) -> np.ndarray:
    """Follow parent pointers to their roots by pointer jumping (log depth, no Python loop per row)."""
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            return parent
        parent = nxt


def make_shop(
    n_users: int = 2000,
    n_items: int = 600,
    n_personas: int = 12,
    seed: int = 0,
    *,
    mean_purchases: float = 12.0,
    noise: float = 0.1,
    repeat: float = 0.2,
    dual_item_frac: float = 0.15,
    generic_frac: float = 0.03,
    zipf: float = 1.0,
    prevalence_skew: float = 1.0,
    catalogue: Sequence[_Vocabulary] = CATALOGUE,
) -> SyntheticShop:
    """Generate a shop: users with planted personas buy mostly items of those personas.

    - `noise`: share of purchases drawn from overall popularity, ignoring personas;
    - `repeat`: share of a user's later purchases that re-buy one of their earlier items;
    - `zipf`: popularity exponent (weight of the r-th most popular item ∝ r^-zipf);
    - `prevalence_skew`: persona prevalence ∝ rank^-skew, in a seeded random persona order;
    - purchases per user are 2 + Pareto(1.5) scaled so that the mean is about `mean_purchases`;
    - `catalogue`: the persona vocabularies (`CATALOGUE`, or `GROCERY` for `make_sparse_shop`).
    """
    if not 1 <= n_personas <= len(catalogue):
        raise ValueError(f"n_personas must be in 1..{len(catalogue)}, got {n_personas}")
    personas = PersonaSet(v.persona for v in catalogue[:n_personas])
    n_generic = int(round(generic_frac * n_items))
    if n_users < 1 or n_items - n_generic < n_personas:
        raise ValueError(f"need n_users >= 1 and at least {n_personas} persona items, got {n_items} items")
    if mean_purchases < 2:
        raise ValueError("mean_purchases must be at least 2 (every user buys twice)")
    rng = np.random.default_rng(seed)

    names, item_personas = _make_items(rng, n_items, n_personas, n_generic, dual_item_frac, catalogue)
    popularity = (1.0 + rng.permutation(n_items)) ** -zipf
    prices = np.round(np.exp(rng.normal(np.log(9.0), 0.8, n_items)), 2).clip(0.5)

    prevalence = (1.0 + rng.permutation(n_personas)) ** -prevalence_skew
    prevalence /= prevalence.sum()
    table, k = _plant_personas(rng, n_users, prevalence)

    # heavy-tailed purchase counts (Pareto shape 1.5 has mean 2 before scaling), at least 2
    n_buys = 2 + np.floor(rng.pareto(1.5, n_users) * (mean_purchases - 2) / 2).astype(np.int64)
    n_buys = np.minimum(n_buys, 50 * int(mean_purchases))
    user = np.repeat(np.arange(n_users), n_buys)
    n_events = len(user)

    groups = [np.array([i for i, ps in enumerate(item_personas) if m in ps]) for m in range(n_personas)]
    cdf, members = _segment_sampler(groups, popularity)
    persona = table[user, rng.integers(0, k[user])]
    item = members[np.searchsorted(cdf, persona + rng.random(n_events), side="right").clip(max=len(cdf) - 1)]
    global_cdf = np.cumsum(popularity) / popularity.sum()
    is_noise = rng.random(n_events) < noise
    item[is_noise] = np.searchsorted(global_cdf, rng.random(is_noise.sum()), side="right").clip(max=n_items - 1)

    # repeats: a later purchase copies one of the same user's earlier purchases
    start = np.repeat(np.cumsum(n_buys) - n_buys, n_buys)
    position = np.arange(n_events) - start
    is_repeat = (position > 0) & (rng.random(n_events) < repeat)
    parent = np.arange(n_events)
    parent[is_repeat] = start[is_repeat] + (rng.random(is_repeat.sum()) * position[is_repeat]).astype(np.int64)
    item = item[_resolve_repeats(parent)]

    ts = np.round(_ANCHOR + rng.random(n_events) * _YEAR, 3)
    quantity = rng.choice(np.arange(1, 7), size=n_events, p=_QTY_P)
    order = np.argsort(ts, kind="stable")
    user, item, ts, quantity = user[order], item[order], ts[order], quantity[order]

    width_u, width_i = len(str(n_users)), len(str(n_items))
    user_ids = np.array([f"U{u:0{width_u}d}" for u in range(n_users)], dtype=object)
    item_ids = np.array([f"P{i:0{width_i}d}" for i in range(n_items)], dtype=object)
    item_names = np.array(names, dtype=object)
    width_e = len(str(n_events))
    frame = pd.DataFrame({
        "event_id": [f"e{j:0{width_e}d}" for j in range(n_events)],
        "user_id": user_ids[user],
        "item_id": item_ids[item],
        "item_name": item_names[item],
        "quantity": quantity.astype(np.int64),
        "price": prices[item].astype(np.float64),
        "ts": ts.astype(np.float64),
    }, columns=FRAME_COLUMNS)
    truth = {
        user_ids[u]: tuple(int(m) for m in row[row >= 0]) for u, row in enumerate(table)
    }
    log.debug("synthetic shop: %d users, %d items, %d events", n_users, n_items, n_events)
    return SyntheticShop(
        frame=frame,
        personas=personas,
        user_truth=truth,
        item_personas={item_ids[i]: ps for i, ps in enumerate(item_personas)},
        prevalence=prevalence,
    )


def make_sparse_shop(
    n_users: int = 1_500,
    n_items: int = 24_000,
    n_personas: int = 30,
    seed: int = 0,
    **overrides: float,
) -> SyntheticShop:
    """A differently shaped shop: a grocery-like catalogue of `n_items` (over 20,000 bought by
    default) with 30 personas and sparse baskets — a user buys ~0.1% of the catalogue (median 24
    items, heavy-tailed), the median item has 3 buyers — so a user's Ψ row is spread thinly over
    many personas: the median positive Ψ entry is 0.0010 at a 5% budget (0.0004 at 1%) against
    0.0024 in `make_shop`. That is the grocery shape on which absolute stream thresholds froze
    users on their first persona set (with the old ε = 0.01 / hysteresis 0.005 the in-memory
    stream gives 17% of users one set, 3.7× the planted truth's 4.5%).
    `overrides` are passed to `make_shop` (e.g. `mean_purchases`, `zipf`).

    >>> shop = make_sparse_shop(n_users=60, n_items=400, n_personas=30, seed=1)
    >>> len(shop.personas), shop.frame["item_id"].nunique() <= 400
    (30, True)
    """
    params: dict[str, Any] = dict(mean_purchases=80.0, noise=0.2, repeat=0.05, dual_item_frac=0.1,
                        generic_frac=0.01, zipf=0.6, prevalence_skew=0.8)
    params.update(overrides)
    return make_shop(n_users, n_items, n_personas, seed, catalogue=GROCERY, **params)


def top_set_share(sets: Iterable[Sequence[int]]) -> float:
    """Share of users whose persona set equals the most common set (order ignored; 0 for none).

    >>> top_set_share([(1, 2), (2, 1), (3,)])
    0.6666666666666666
    """
    from collections import Counter

    counts = Counter(frozenset(int(p) for p in s) for s in sets)
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0
