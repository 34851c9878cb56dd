// LoRA Workshop: a tooltip on the family badge of Lora cards (the badge itself is CSS).
(function() {
    function label(card) {
        var family = card.dataset.sortLwfamily;
        if (!family || card.title) return;
        var fit = card.dataset.sortLwfit;  // only for files that name no model family
        if (fit) {
            card.title = "No model family in its metadata or keys; " + fit;
            return;
        }
        card.title = card.dataset.sortLwcompat === "no" ?
            family + " LoRA: made for another model family than the loaded checkpoint" :
            family + " LoRA";
    }
    function update() {
        document.querySelectorAll(".extra-network-pane .card[data-sort-lwfamily]").forEach(label);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(update);
    }
})();

// LoRA Workshop training tab: refresh the job's status every 2 s while the tab is on screen
// (clicks the tab's own Refresh button, whose handler bypasses the queue).
(function() {
    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }
    setInterval(function() {
        if (document.hidden) return;
        var app = root();
        var tab = app.querySelector("#tab_lora_workshop");
        var button = app.querySelector("#lora_workshop_poll");
        if (!tab || !button || tab.offsetParent === null) return;  // another tab is shown
        button.click();
    }, 2000);
})();
