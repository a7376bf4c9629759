"""Procedural children's stories: the embedded offline corpus for the smoke study and CI.

Why: real TinyStories text may not be shipped with the repo and the hub is not always reachable,
yet a small char-level model needs text with learnable structure at several scales (spelling,
pronoun agreement, a/an, dialogue punctuation, plot order, morals tied to the plot) and enough
combinatorial variety that the loss keeps falling for thousands of steps.

Story i of seed s depends only on (s, i), so a longer corpus extends a shorter one and the
story-level train/validation split (see moe_core.data) stays stable as the size grows.
"""

import random
import re
from dataclasses import dataclass

GIRLS = ("Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Ella", "Rosa", "Ruby", "Daisy",
         "Molly", "Nora", "Amy", "Kim", "Sara", "Ivy", "Jade", "Tess", "Maya", "Grace", "Hannah")
BOYS = ("Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Jake", "Ollie", "Noah", "Eli",
        "Toby", "Owen", "Rex", "Dan", "Bob", "Ned", "Hugo", "Milo", "Timmy", "Billy")
KINDS = ("girl", "boy", "bunny", "cat", "dog", "bear", "fox", "duck", "frog", "mouse", "owl", "pig",
         "lion", "turtle", "squirrel", "bird", "puppy", "kitten", "horse", "elephant", "monkey",
         "hedgehog", "deer", "goat", "sheep", "chick", "tiger", "penguin")
SIZES = ("little", "small", "tiny", "big", "young", "happy", "kind", "shy", "brave", "silly",
         "curious", "clever", "fluffy", "sleepy")
PLACES = ("park", "forest", "garden", "beach", "farm", "big hill", "pond", "meadow", "town",
          "playground", "river", "school", "backyard", "zoo", "library", "jungle", "lake",
          "village", "field of flowers", "old barn", "sunny valley", "snowy mountain", "market")
COLORS = ("red", "blue", "yellow", "green", "pink", "purple", "orange", "white", "brown", "gold")
LOOKS = ("big", "small", "shiny", "soft", "old", "new", "funny", "pretty", "round", "tiny",
         "striped", "sparkly", "fuzzy", "special", "little")
TOYS = ("ball", "kite", "hat", "toy car", "doll", "box", "stone", "teddy bear", "book", "drum",
        "boat", "train", "bucket", "balloon", "scarf", "shell", "crayon", "puzzle", "robot",
        "umbrella", "truck", "spoon", "flower", "rock", "bell", "cup", "sock", "blanket")
HIDING = ("under the bed", "behind a tree", "in a bush", "under a big leaf", "next to the door",
          "in the sand", "under the table", "inside a box", "on a high shelf", "in the tall grass",
          "behind the couch", "near the pond", "in a hole", "under a rock")
ELDERS = ("mom", "dad", "grandma", "grandpa", "teacher", "aunt", "uncle")
FEARS = ("the dark", "the big slide", "the loud thunder", "the deep water", "the tall tree",
         "the big dog next door", "the noisy wind", "the long bridge", "the bees", "the swing")
BUILDS = ("a sand castle", "a tall tower of blocks", "a tree house", "a snowman", "a fort",
          "a little boat", "a bird house", "a big cake", "a paper plane", "a bridge of sticks")
TROUBLES = (("a bird with a hurt wing", "the bird"), ("a kitten stuck in a tree", "the kitten"),
            ("an old man who dropped his apples", "the old man"),
            ("a lost puppy", "the puppy"), ("a duck that could not find its way home", "the duck"),
            ("a little ant carrying a big crumb", "the ant"),
            ("a baby bird that fell from its nest", "the baby bird"))
BREAKS = ("mom's favorite vase", "a glass of juice", "the new lamp", "dad's blue cup",
          "the cookie jar", "grandma's plate", "the flower pot", "the window")
FINDS = (("a small key", "a little door in the wall"), ("an old map", "a secret path"),
         ("a wooden box", "a shiny ring"), ("a strange seed", "a giant flower"),
         ("a golden egg", "a tiny dragon"), ("a bottle with a note", "a message from a friend"))
GAMES = ("tag", "hide and seek", "catch", "a race", "jump rope", "ball", "a guessing game")
FEELINGS_GOOD = ("happy", "glad", "excited", "proud", "joyful", "cheerful")
FEELINGS_BAD = ("sad", "upset", "worried", "lonely", "grumpy", "scared")
OPENERS = ("Once upon a time", "One day", "One sunny day", "Long ago", "On a rainy morning",
           "One cold winter day", "One warm summer day", "Every morning", "One bright spring day",
           "Not long ago", "One windy afternoon")
# speech verbs by the line's last character, so the verb agrees with the punctuation
SAY = {"?": ("asked", "wondered", "said"), "!": ("shouted", "cried", "called", "said"),
       ".": ("said", "whispered", "replied", "smiled and said")}
ENDINGS = ("The end.", "", "", "They all lived happily ever after.", "",
           "And that is how {hero} learned something new.")

DETAILS = ("The sun was warm and the sky was blue.", "A soft wind moved the leaves.",
           "Birds were singing in the trees.", "It was a quiet day.", "The grass was wet and green.",
           "Big white clouds floated by.", "{friend} was there too.", "{He} wore {his} {color} boots.",
           "A little bee buzzed past {his} nose.", "{He} could smell fresh bread from far away.",
           "The flowers were {color} and {look}.", "{He} hummed a happy song.",
           "It was almost time for lunch.", "A butterfly landed on a flower.")

Ctx = dict[str, str]


def _an(phrase: str) -> str:
    """Indefinite article agreeing with the phrase (a model can learn this rule)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pronouns(prefix: str, gender: str) -> Ctx:
    sub, obj, pos = {"f": ("she", "her", "her"), "m": ("he", "him", "his")}[gender]
    return {prefix + "he": sub, prefix + "him": obj, prefix + "his": pos,
            prefix + "He": _cap(sub), prefix + "His": _cap(pos)}


def _character(rng: random.Random, avoid: str = "") -> tuple[str, str, str]:
    """(name, kind, gender); girls/boys keep their kind, animals get any name."""
    gender = rng.choice("fm")
    names = [n for n in (GIRLS if gender == "f" else BOYS) if n != avoid]
    kind = rng.choice(KINDS)
    if kind in ("girl", "boy"):
        gender = "f" if kind == "girl" else "m"
        names = [n for n in (GIRLS if gender == "f" else BOYS) if n != avoid]
    return rng.choice(names), kind, gender


def _say(rng: random.Random, who: str, line: str) -> str:
    """One line of dialogue in one of three tag positions, with correct quote punctuation."""
    verb = rng.choice(SAY[line[-1]])
    form = rng.randrange(3)
    if form == 0:
        return f'{who} {verb}, "{line}"'
    inner = line[:-1] + "," if line.endswith(".") else line
    if form == 1:
        return f'"{inner}" {verb} {who}.'
    return f'"{inner}" {who} {verb.split(" and ")[-1]}.'

@dataclass(frozen=True)
class Say:
    """A dialogue beat: slot naming the speaker, alternative lines."""

    who: str
    lines: tuple[str, ...]


# A paragraph is a list of beats; a beat is a tuple of alternative templates or a Say.
INTRO = [
    ("{opener}, there was {hero_a} named {hero}.",
     "{opener}, {hero_a} named {hero} lived near the {place}.",
     "{opener}, {hero}, {hero_a}, went to the {place}.",
     "{opener}, in {house_a} by the {place}, lived {hero_a} called {hero}."),
    ("{He} loved to play with {his} {toy}.",
     "{He} liked to run and jump all day.",
     "{He} was always {good} when the sun was out.",
     "{He} had {color_toy_a} that {he} took everywhere.",
     "Every day, {he} played with {his} friend {friend}, {friend_a}."),
]
MORAL = [("{hero} learned that {moral}.", "And so {hero} learned that {moral}.",
          "The moral of the story is that {moral}.",
          "From that day on, {hero} always remembered that {moral}.", "{hero} and {friend} knew that {moral}."),
         ENDINGS]

# plot -> (paragraphs, morals tied to that plot)
PLOTS = {
    "lost": ([
        [("One day, {hero} could not find {his} {color} {toy}. {He} looked everywhere, but it was gone.",
          "At the {place}, {hero} put down {his} {toy} to look at a butterfly. "
          "When {he} turned back, the {toy} was gone!"),
         ("{hero} felt very {bad}.", "{He} began to cry.", "{hero} was {bad} and did not know what to do.")],
        [Say("friend", ("Why are you {bad}, {hero}?", "What is wrong, {hero}?", "Do you need help?")),
         Say("hero", ("I lost my {toy}!", "I cannot find my {color} {toy}.", "My {toy} is gone and I miss it.")),
         Say("friend", ("Let's look together.", "I will help you find it!",
                        "Don't worry. Two friends can look better than one."))],
        [("They looked {hide1} and {hide2}. At last, {friend} saw something {color} {hide3}.",
          "{hero} and {friend} searched {hide1}. Then they searched {hide2}. Finally, they found the {toy} {hide3}."),
         ("{hero} hugged {his} {toy} and smiled.", "{hero} jumped up and down. {He} was so {good}!")],
    ], ("friends help each other", "it is good to ask for help")),
    "sharing": ([
        [("One day, {hero} got {toy_a} from {his} {elder}. It was {color} and {look}.",
          "{hero} found {toy_a} at the {place}. {He} did not want anyone else to touch it."),
         ("{friend} came over and wanted to play with it too.", "Soon {friend} saw the {toy} and asked to play.")],
        [Say("friend", ("Can I play with your {toy}, please?", "Will you share your {toy} with me?")),
         Say("hero", ("No, it is mine!", "No. I want to play alone.")),
         ("{friend} felt {bad} and walked away.", "{friend} looked down at the ground. {fHe} was {bad}.")],
        [("{hero} played alone, but it was not fun anymore. {He} thought about {friend}.",
          "Soon {hero} felt lonely. The {toy} was not as fun without a friend."),
         ("{He} ran to {friend} and said sorry.", "{He} went to find {friend}."),
         Say("hero", ("Let's play with my {toy} together.", "I am sorry. You can have a turn.")),
         ("They played all day and had lots of fun.", "{friend} smiled, and they took turns until the sun went down.")],
    ], ("sharing makes play more fun", "it is kind to share")),
    "fear": ([
        [("{hero} was afraid of {fear}.", "There was one thing {hero} did not like: {fear}."),
         ("Every time {he} saw it, {he} ran to {his} {elder}.", "It made {him} feel small and {bad}.")],
        [Say("elder_who", ("You are braver than you think.", "I will be right here with you.",
                           "Let's try it together, one little step at a time.")),
         ("{hero} took a deep breath.", "{hero} held {his} {elder}'s hand.",
          "{hero} closed {his} eyes and counted to three.")],
        [("{He} tried, and it was not so bad after all!", "Slowly, {he} faced {fear}. Nothing bad happened."),
         ("{hero} felt {good} and tall.", "{He} laughed and wanted to do it again."),
         Say("hero", ("I did it!", "I am not scared anymore!", "That was fun!"))],
    ], ("being brave means trying even when you are scared", "new things are not so scary")),
    "new_friend": ([
        [("{hero} was alone at the {place}. {He} felt {bad}.", "{hero} had no one to play with at the {place}."),
         ("Then {he} saw {friend_a} sitting by a tree.", "Then {friend_a} walked by, carrying {toy_a}.")],
        [Say("hero", ("Hello! My name is {hero}. What is your name?", "Hi! Do you want to play?")),
         Say("friend", ("I am {friend}. I just moved here.", "Yes! I love to play {game}.")),
         ("They played {game} until dinner time.", "They played {game} and laughed a lot.")],
        [("From that day on, {hero} and {friend} were best friends.",
          "{hero} was not lonely anymore. {He} had a new friend.")],
    ], ("saying hello can make a new friend", "nobody has to be alone")),
    "build": ([
        [("{hero} and {friend} wanted to make {build}.", "At the {place}, {hero} had a big idea: to make {build}."),
         ("They worked hard all morning.", "{hero} worked and worked.")],
        [("But then the wind blew, and it fell down!", "Oh no! It broke into pieces."),
         ("{hero} felt {bad} and wanted to stop.", "{hero} sat down and frowned."),
         Say("friend", ("Let's try again. We can do it!", "Don't give up, {hero}!"))],
        [("This time they worked together and went slowly.", "They tried again, and this time they helped each other."),
         ("It was the best one they had ever made.", "When they were done, it stood strong and tall."),
         ("{hero} and {friend} were very {good}.", "Everyone came to see it.")],
    ], ("you should never give up", "working together makes things strong")),
    "mistake": ([
        [("{hero} was playing with {his} {toy} inside the house.", "{hero} was running in the kitchen."),
         ("Crash! {He} broke {broken}.", "Oops! {He} knocked over {broken}, and it broke.")],
        [("{hero} was {bad}. {He} hid the pieces {hide1}.",
          "{hero} did not want to tell anyone. {He} went to {his} room."),
         ("But {he} did not feel good inside.", "{His} tummy felt funny and {he} could not play.")],
        [("At last, {he} went to {his} {elder}.", "Then {hero} found {his} {elder}."),
         Say("hero", ("I broke it. I am sorry.", "I have to tell you something. It was me.")),
         Say("elder_who", ("Thank you for telling the truth.", "It is okay. I am proud of you for telling me.")),
         ("{hero} felt much better.", "They cleaned it up together.")],
    ], ("telling the truth is always best", "it is brave to say sorry")),
    "help": ([
        [("On the way to the {place}, {hero} saw {trouble_a}.", "At the {place}, {hero} found {trouble_a}."),
         ("{trouble_The} looked {bad}.", "Nobody else stopped to help.")],
        [Say("hero", ("Don't worry, I will help you.", "Can I help?")),
         ("{hero} was gentle and careful.", "{hero} asked {friend} to help too, and {fhe} came right away."),
         ("Soon {trouble} was safe.", "After a while, {trouble} was fine again.")],
        [("{trouble_The} was so thankful.", "{hero} felt warm and {good} inside."),
         ("{hero} waved goodbye and went home to tell {his} {elder}.",
          "{His} {elder} gave {him} a big hug when {he} told the story.")],
    ], ("being kind makes the world better", "we should help those in need")),
    "find": ([
        [("While playing at the {place}, {hero} found {found}.", "{hero} dug {hide1} and found {found}."),
         Say("hero", ("What is this?", "Wow, look at this!")),
         ("{He} showed it to {friend}.", "{friend} came running to see.")],
        [("They were curious, so they followed it.", "They looked at it for a long time."),
         ("At the end, they found {secret}!", "It led them to {secret}.")],
        [("{hero} and {friend} could not believe their eyes.", "It was the best surprise ever."),
         ("They kept it as their special secret.", "They ran home to tell everyone.")],
    ], ("being curious can lead to wonderful things", "the world is full of surprises")),
    "race": ([
        [("There was a big race at the {place}.", "{hero} and {friend} had a race to the {place}."),
         ("{hero} wanted to win more than anything.", "{hero} was fast and wanted to be first.")],
        [("In the middle of the race, {friend} fell and hurt {fhis} knee.",
          "Near the end, {friend} tripped on a rock."),
         ("{hero} stopped running.", "{hero} could still win, but {he} turned back."),
         Say("hero", ("Are you okay? Let me help you.", "Hold my hand, {friend}."))],
        [("They crossed the line together, last of all.", "They walked to the end side by side."),
         ("Everyone clapped for them.", "They did not win, but they were {good}.")],
    ], ("kindness matters more than winning", "a good friend never leaves you behind")),
}


def _paragraph(rng: random.Random, ctx: Ctx, beats: list) -> str:
    """Fill each beat with one of its alternatives; empty alternatives drop out."""
    parts = (_say(rng, ctx[b.who], rng.choice(b.lines).format_map(ctx)) if isinstance(b, Say)
             else rng.choice(b).format_map(ctx) for b in beats)
    return " ".join(p for p in parts if p)


def _context(rng: random.Random) -> Ctx:
    name, kind, gender = _character(rng)
    fname, fkind, fgender = _character(rng, avoid=name)
    elder = rng.choice(ELDERS)
    trouble, trouble_the = rng.choice(TROUBLES)
    found, secret = rng.choice(FINDS)
    toy, color, look = rng.choice(TOYS), rng.choice(COLORS), rng.choice(LOOKS)
    hide1, hide2, hide3 = rng.sample(HIDING, 3)
    return {
        "hero": name, "hero_a": _an(f"{rng.choice(SIZES)} {kind}"),
        "friend": fname, "friend_a": _an(f"{rng.choice(SIZES)} {fkind}"),
        **_pronouns("", gender), **_pronouns("f", fgender),
        "elder": elder, "elder_who": f"{name}'s {elder}",
        "place": rng.choice(PLACES), "toy": toy, "toy_a": _an(f"{rng.choice(LOOKS)} {toy}"),
        "color": color, "color_toy_a": _an(f"{color} {toy}"), "look": look, "house_a": _an(f"{look} house"),
        "good": rng.choice(FEELINGS_GOOD), "bad": rng.choice(FEELINGS_BAD),
        "opener": rng.choice(OPENERS), "fear": rng.choice(FEARS), "build": rng.choice(BUILDS),
        "trouble_a": trouble, "trouble": trouble_the, "trouble_The": _cap(trouble_the),
        "broken": rng.choice(BREAKS), "found": found, "secret": secret, "game": rng.choice(GAMES),
        "hide1": hide1, "hide2": hide2, "hide3": hide3,
    }


def generate_story(index: int, seed: int = 0) -> str:
    """Story `index` of corpus `seed`: paragraphs separated by blank lines, ends with a moral."""
    rng = random.Random(f"moe_core.synthetic:{seed}:{index}")
    ctx = _context(rng)
    plot, morals = PLOTS[rng.choice(tuple(PLOTS))]
    paragraphs = [_with_detail(rng, ctx, _paragraph(rng, ctx, beats)) for beats in (INTRO, *plot)]
    paragraphs.append(_paragraph(rng, {**ctx, "moral": rng.choice(morals)}, MORAL))
    return re.sub(r"^([a-z])|([.!?] )([a-z])", _upper_match, "\n\n".join(paragraphs), flags=re.M)


def _with_detail(rng: random.Random, ctx: Ctx, paragraph: str) -> str:
    """Sometimes insert a scene sentence after the first sentence, so positions vary."""
    if rng.random() < 0.6:
        return paragraph
    head, sep, tail = paragraph.partition(". ")
    detail = rng.choice(DETAILS).format_map(ctx)
    return f"{head}. {detail} {tail}" if sep else f"{paragraph} {detail}"


def _upper_match(m: re.Match) -> str:
    """Sentence-initial capital (templates may start a sentence with a lower-case slot)."""
    return m.group(0).upper()


def generate_stories(n_chars: int, seed: int = 0) -> list[str]:
    """Stories 0, 1, 2, ... of `seed` until their total length reaches `n_chars`."""
    if n_chars < 1:
        raise ValueError(f"n_chars must be >= 1, got {n_chars}")
    stories, total = [], 0
    while total < n_chars:
        stories.append(generate_story(len(stories), seed))
        total += len(stories[-1])
    return stories
